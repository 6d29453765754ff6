"""Cross-user batching: which queued jobs share one pass of a worker (pure, no I/O).

A job kind that batches names a plan function (``JobKind.batch``, ``"module:function"``, imported lazily
and never pulling torch into the service): ``plan(params, settings) -> (key, samples) | None``. Jobs
with equal keys can share a denoising pass; ``samples`` is what one job adds to the pass's batch;
None means the job always runs alone. A group is formed from the head of the fair (round-robin) order
only: the head, then the jobs right behind it while they share its key and the samples fit in
``batch_max``. The first job that does not fit ends the group, so no job is ever skipped for a later one,
and a job without partners starts at once (nothing waits for a batch to fill).
"""
from __future__ import annotations

import functools
import importlib
import logging
from collections.abc import Callable, Hashable, Sequence
from typing import Any, TypeVar

log = logging.getLogger(__name__)

J = TypeVar("J")
Plan = tuple[Hashable, int] | None
PlanFunction = Callable[[dict[str, Any], dict[str, Any]], Plan]


@functools.cache
def plan_function(path: str) -> PlanFunction:
    """Import the plan function at ``module:function`` once."""
    module_name, _, name = path.partition(":")
    return getattr(importlib.import_module(module_name), name)


def batch_group(order: Sequence[J], plan_of: Callable[[J], Plan], batch_max: int) -> list[J]:
    """The jobs from the head of `order` that share one pass, up to `batch_max` samples (at least the head)."""
    if not order:
        return []
    head = order[0]
    plan = plan_of(head)
    if plan is None or batch_max <= 1:
        return [head]
    key, samples = plan
    group = [head]
    for job in order[1:]:
        other = plan_of(job)
        if other is None or other[0] != key or samples + other[1] > batch_max:
            break
        group.append(job)
        samples += other[1]
    return group


def safe_plan(plan: PlanFunction, params: dict[str, Any], settings: dict[str, Any], job_id: int) -> Plan:
    """The job's plan, or None (alone) when its params puzzle the plan function: the pipeline will tell."""
    try:
        result = plan(params, settings)
    except Exception:
        log.warning("job %d: could not plan its batch; it runs alone", job_id, exc_info=True)
        return None
    if result is None:
        return None
    key, samples = result
    return (key, max(1, int(samples)))
