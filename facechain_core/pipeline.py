"""The one shape every pipeline has: load once, run many times with a progress callback.

A worker process (one per GPU) creates a pipeline the first time a job of its kind arrives,
calls ``load(context)`` once and keeps it resident; each job is ``run(params, progress)``.
Params and results are JSON-able dicts with file paths, never raw bytes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol


class Progress(Protocol):
    """Reports progress; raises ``JobCancelled`` from inside when the job was cancelled."""

    def __call__(self, step: int, total: int, text: str | None = None) -> None: ...

    def yield_point(self) -> None:
        """Lets the worker run waiting short jobs now (long jobs call this at checkpoints)."""


class QuietProgress:
    """The ``Progress`` of a run nobody watches (a bench, a script): reports nothing, lets no other job in."""

    def __call__(self, step: int, total: int, text: str | None = None) -> None:
        pass

    def yield_point(self) -> None:
        pass


@dataclass
class PipelineContext:
    """What a worker hands to ``Pipeline.load``: where models are, which device, shared caches."""

    models_dir: Path
    device: str = "cpu"  # "cuda:0", "cpu"
    dtype: str = "float32"  # "float16" on GPU
    memory_budget_mb: int = 0  # 0: no limit for the resident-pipeline LRU
    settings: dict[str, Any] = field(default_factory=dict)  # per-feature settings from the config
    shared: dict[str, Any] = field(default_factory=dict)  # resources shared by pipelines in one worker

    def model_path(self, name: str, feature: str) -> Path:
        """Where manifest model `name` is (an override in settings["model_paths"] wins);
        raises ModelNotInstalled with the operator's pull command."""
        from facechain_core.manifest import resolve

        return resolve(self.models_dir, name, feature, self.settings.get("model_paths"))


@dataclass
class JobResult:
    """What ``run`` returns: output files (absolute paths) and JSON-able metadata."""

    files: list[Path] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"files": [str(p) for p in self.files], "meta": self.meta}


class Pipeline(Protocol):
    """The shape every feature's pipeline implements."""

    def load(self, context: PipelineContext) -> None:
        """Loads models once; raises ModelNotInstalled when weights are missing."""

    def run(self, params: dict[str, Any], progress: Progress) -> JobResult:
        """Runs one job; numbered steps inside; expected failures raise UserFacingError."""

    def close(self) -> None:
        """Frees what ``load`` took."""
