"""Where worker processes run: ``local`` (child processes of the bot) or ``ray`` (actors on a cluster)."""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from bot.config import SchedulerSettings
from bot.engine.backends.base import Backend, SlotInfo, query_gpu_memory_mb
from bot.engine.backends.local import LocalBackend, device_env


def local_backend(devices: list[str], context: Mapping[str, Any], *, secrets: Iterable[str] = (),
                  memory_budget_mb: int = 0) -> LocalBackend:
    """Worker processes on this machine, with each GPU's memory (for placement rules) where nvidia-smi tells."""
    infos = []
    for configured in devices:
        device, env = device_env(configured)
        index = env["CUDA_VISIBLE_DEVICES"]
        infos.append(SlotInfo(name=configured if index else "cpu", device=device, gpu_index=int(index) if index else None,
                              gpu_memory_mb=query_gpu_memory_mb(index)))
    return LocalBackend(devices, context, secrets=secrets, infos=infos, memory_budgets_mb=[memory_budget_mb] * len(devices))


def create_backend(settings: SchedulerSettings, context: Mapping[str, Any], *, data_dir: Path, devices: list[str],
                   secrets: Iterable[str] = (), kind_needs: Mapping[str, list[list[str]]] | None = None) -> Backend:
    """The backend `settings.backend` names."""
    if settings.backend == "ray":
        from bot.engine.backends.ray_backend import RayBackend

        return RayBackend(context, data_dir=data_dir, address=settings.ray_address, namespace=settings.ray_namespace,
                          gpu_resource=settings.ray_gpu_resource, node_labels=settings.ray_node_labels, cache_mb=settings.ray_cache_mb, secrets=secrets,
                          kind_needs=kind_needs, memory_budget_mb=settings.memory_budget_mb)
    return local_backend(devices, context, secrets=secrets, memory_budget_mb=settings.memory_budget_mb)
