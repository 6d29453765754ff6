"""Fast mode: few-step accelerator LoRAs and when a job uses one.

An accelerator (``accelerators.toml``) is a LoRA distilled for a few-step sampler: LCM-LoRA, TCD, Hyper-SD.
It goes into a third adapter slot ("fast") beside the user's and the style's and composes with FaceID; the
job's sampler takes the accelerator's scheduler, step count and guidance instead of the style's. Whether a
job runs fast is decided once, when it is queued (``decide_fast``): the user's choice ("on"/"off") wins,
else the operator's ``fast_mode`` ("off", "on", or "auto": fast while more than ``fast_auto_queue`` jobs
wait). A style opts out with ``fast = false`` where its look suffers; such a job runs normally.
"""
from __future__ import annotations

import tomllib
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

DEFAULT_FILE = Path(__file__).with_name("accelerators.toml")
FAST_SLOT = "fast"  # the adapter slot of the accelerator LoRA
FAST_MODES = ("off", "on", "auto")
DEFAULT_AUTO_QUEUE = 4  # auto: fast mode while more than this many jobs wait when one is queued
CHOICES = ("on", "off")  # what a user may choose; None leaves it to the operator

Family = Literal["sd15", "sdxl"]


class Accelerator(BaseModel):
    """One accelerator: its LoRA per family and the sampler it was distilled for."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    id: str = ""
    name: str = Field(min_length=1)
    scheduler: str = Field(pattern=r"^[A-Z][A-Za-z0-9]*Scheduler$")
    scheduler_config: dict[str, Any] = {}
    steps: int = Field(ge=1, le=16)
    guidance_scale: float = Field(ge=0.0, le=3.0)
    eta: float | None = Field(default=None, ge=0.0, le=1.0)
    weight: float = Field(default=1.0, ge=0.0, le=2.0)
    inpainting: bool
    controlnet: bool
    models: dict[Family, str]
    features: dict[Family, str]

    @model_validator(mode="after")
    def _same_families(self) -> Accelerator:
        if set(self.models) != set(self.features):
            raise ValueError(f"models {sorted(self.models)} and features {sorted(self.features)} must name the "
                             "same families")
        return self

    def supports(self, family: str, *, inpainting: bool = False, controlnet: bool = False) -> bool:
        """Whether it runs on `family` with what the job needs (an inpainting base, ControlNets)."""
        return family in self.models and (self.inpainting or not inpainting) and (self.controlnet or not controlnet)

    def sampler(self, sampler: dict[str, Any]) -> dict[str, Any]:
        """A style's (or a pipeline's) sampler settings with this accelerator's steps and guidance."""
        eta = {} if self.eta is None else {"eta": self.eta}
        return {**sampler, "steps": self.steps, "guidance_scale": self.guidance_scale, **eta}

    def scheduler_spec(self) -> tuple[str, tuple[str, dict[str, Any]]]:
        """The key and (class name, overrides) of its scheduler, as ``ResidentBase.use_scheduler`` takes them."""
        return f"{FAST_SLOT}:{self.id}", (self.scheduler, dict(self.scheduler_config))


@dataclass(frozen=True)
class Accelerators:
    """Every accelerator of the data file, and the one used when the operator names none."""

    by_id: dict[str, Accelerator]
    default: str

    def get(self, accelerator_id: str | None) -> Accelerator:
        """The accelerator `accelerator_id` (None: the default); ValueError naming the known ones."""
        key = accelerator_id or self.default
        if key not in self.by_id:
            raise ValueError(f"unknown accelerator {key!r}, expected one of {sorted(self.by_id)}")
        return self.by_id[key]


def load_accelerators(path: Path = DEFAULT_FILE) -> Accelerators:
    """Parse and validate an accelerators file; ValueError naming the accelerator and key."""
    with Path(path).open("rb") as f:
        raw = tomllib.load(f)
    found: dict[str, Accelerator] = {}
    for key, table in (raw.get("accelerator") or {}).items():
        try:
            found[key] = Accelerator.model_validate({**table, "id": key})
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
                                 for e in exc.errors(include_url=False))
            raise ValueError(f"{path}: accelerator {key!r}: {problems}") from None
    default = raw.get("default")
    if default not in found:
        raise ValueError(f"{path}: default must name an accelerator ({sorted(found)}), got {default!r}")
    return Accelerators(found, default)


@cache
def accelerators() -> Accelerators:
    """The packaged accelerators, read once."""
    return load_accelerators()


def check_fast_settings(settings: dict[str, Any]) -> None:
    """Raise ValueError for a bad ``fast_mode``, ``fast_auto_queue`` or ``fast_accelerator`` setting."""
    mode = settings.get("fast_mode", "off")
    if mode not in FAST_MODES:
        raise ValueError(f"fast_mode must be one of {', '.join(FAST_MODES)}; got {mode!r}")
    queue = settings.get("fast_auto_queue", DEFAULT_AUTO_QUEUE)
    if isinstance(queue, bool) or not isinstance(queue, int) or queue < 0:
        raise ValueError(f"fast_auto_queue must be a whole number of jobs (0 or more); got {queue!r}")
    accelerators().get(settings.get("fast_accelerator"))


def decide_fast(settings: dict[str, Any], choice: str | None, queued: int) -> bool:
    """Whether a job runs fast: the user's choice ("on"/"off") wins; else the operator's ``fast_mode``
    ("auto": when more than ``fast_auto_queue`` jobs wait)."""
    if choice is not None:
        if choice not in CHOICES:
            raise ValueError(f"fast choice must be one of {CHOICES}, got {choice!r}")
        return choice == "on"
    mode = settings.get("fast_mode", "off")
    if mode == "auto":
        return queued > int(settings.get("fast_auto_queue", DEFAULT_AUTO_QUEUE))
    return mode == "on"
