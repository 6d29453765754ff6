"""The lead <-> worker wire format: one JSON object per line over the worker's stdin/stdout.

Lead -> worker::

    {"op": "init", "models_dir", "device", "dtype", "memory_budget_mb", "settings", "log_level"}
    {"op": "run", "job", "kind", "pipeline", "params", "preemptible"}
    {"op": "batch", "kind", "pipeline", "jobs": [{"job", "params"}, ...]}   # one pass for several jobs;
                                          # each job then reports progress/done/error/... as if alone
    {"op": "cancel", "job"}
    {"op": "resume"}                      # answer to "yield": go on with the long job
    {"op": "ping"}                        # answered at once, also while a job runs

Worker -> lead::

    {"op": "ready", "pid"}
    {"op": "progress", "job", "step", "total", "text"}
    {"op": "yield", "job"}                # a preemptible job is at a checkpoint: send a short job or "resume"
    {"op": "done", "job", "result": {"files": [...], "meta": {...}}}
    {"op": "error", "job", "code", "details"}   # a UserFacingError: no retry
    {"op": "crash", "job", "error"}             # a bug (traceback logged by the worker): retried
    {"op": "cancelled", "job"}
    {"op": "pong", "memory": {"rss", "cuda_allocated", "cuda_reserved", "cuda_free", "cuda_total"}}  # bytes, where known

Closing the worker's stdin asks it to exit.
"""
from __future__ import annotations

import json
from typing import Any

# Lead -> worker.
INIT = "init"
RUN = "run"
BATCH = "batch"
CANCEL = "cancel"
RESUME = "resume"
PING = "ping"
# Worker -> lead.
READY = "ready"
PROGRESS = "progress"
YIELD = "yield"
DONE = "done"
ERROR = "error"
CRASH = "crash"
CANCELLED = "cancelled"
PONG = "pong"

# Longest line the lead accepts from a worker (a result lists file paths, never bytes).
MAX_LINE = 16 * 1024 * 1024


def encode(message: dict[str, Any]) -> bytes:
    """Serialises one message as a JSON line (non-JSON values become strings)."""
    return json.dumps(message, default=str, ensure_ascii=False).encode() + b"\n"


def decode(line: bytes) -> dict[str, Any]:
    """Parses one JSON line; raises ValueError on anything but a JSON object with an ``op``."""
    message = json.loads(line)
    if not isinstance(message, dict) or not isinstance(message.get("op"), str):
        raise ValueError(f"not a protocol message: {line[:200]!r}")
    return message
