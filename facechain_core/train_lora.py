"""Identity LoRA training, FaceChain's way: a rank-4 LoRA on the UNet's attention, from a few selfies.

``TrainLoraPipeline.run`` crops the faces, encodes VAE latents and the trigger prompt once, then
trains a peft LoRA adapter on the resident UNet. Every ``checkpoint_every`` steps it saves LoRA,
optimizer and RNG state atomically under ``out_dir/checkpoint/`` (a crash or a cancel resumes from
there) and yields: the worker may run waiting short jobs on the same UNet, with the training
adapter switched off. The result is ``out_dir/pytorch_lora_weights.safetensors`` in diffusers'
format, loadable with ``pipe.load_lora_weights(out_dir)``; the base UNet is left as it was found.

Params of a job::

    {"photos": [{"path": "...", "face": {"box": [x, y, w, h], "landmarks": [[x, y], ...]}}],
     "out_dir": "...", "trigger": "a photo of sks person",
     "steps_per_photo": 200, "max_steps": 800, "rank": 4, "lr": 1.5e-4, "resolution": 512,
     "checkpoint_every": 100, "seed": 0, "batch_size": 1, "cache_latents": true}

A style LoRA (``facechain_core.style_maker``) trains through the same code with ``"crop": "whole"``
(the whole picture, centre-cropped square; no face needed) and ``"captions"``: one prompt per photo
instead of the one trigger prompt.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.training_utils import cast_training_params
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict

from facechain_core.errors import ModelNotInstalled, UserFacingError
from facechain_core.manifest import load_manifest
from facechain_core.pipeline import JobResult, PipelineContext, Progress
from facechain_core.resident import SHARED_KEY, ResidentPipelines
from facechain_core.train_data import DEFAULT_EXPAND, prepare_crops, prepare_whole_crops, to_pixels, with_flips

logger = logging.getLogger(__name__)

TRAIN_ADAPTER = "facechain_train"  # a name no loaded user or style LoRA will carry
TARGET_MODULES = ("to_k", "to_q", "to_v", "to_out.0")
WEIGHT_NAME = "pytorch_lora_weights.safetensors"
CHECKPOINT_DIR = "checkpoint"
CHECKPOINT_FILE = "state.pt"
CHECKPOINT_VERSION = 1
WEIGHT_DECAY = 1e-2
MAX_GRAD_NORM = 1.0
FINAL_LOSS_WINDOW = 10  # one step's loss depends on its random timestep; report a mean
LOSS_CURVE_POINTS = 8
ENCODE_BATCH = 4
FEATURE = "train"
RESIDENT_KEY = "train_lora:sd15"
# The rare-token trigger FaceChain-style identity LoRAs are trained with.
DEFAULT_TRIGGER = "a photo of sks person"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
CROPS = ("face", "whole")  # face-centred crops (identity) or the whole picture (style)

STAGE_PREPARING = "train.stage.preparing"
STAGE_TRAINING = "train.stage.training"
STAGE_SAVING = "train.stage.saving"


@dataclass(frozen=True)
class TrainParams:
    """One training job's parameters, checked."""

    photos: list[dict[str, Any]]
    out_dir: Path
    trigger: str
    steps_per_photo: int = 200
    max_steps: int = 800
    rank: int = 4
    lr: float = 1.5e-4
    resolution: int = 512
    checkpoint_every: int = 100
    seed: int = 0
    batch_size: int = 1
    cache_latents: bool = True
    expand: float = DEFAULT_EXPAND
    crop: str = "face"
    captions: list[str] | None = None  # one prompt per photo; None: the trigger for every photo

    @classmethod
    def from_dict(cls, params: dict[str, Any]) -> TrainParams:
        """Build from a job's params dict; raise ValueError naming the bad key and value."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(params) - names)
        if unknown:
            raise ValueError(f"unknown training params {unknown}")
        for key in ("photos", "out_dir", "trigger"):
            if key not in params:
                raise ValueError(f"training params need {key!r}")
        values = dict(params)
        values["out_dir"] = Path(params["out_dir"])
        values["photos"] = list(params["photos"])
        if params.get("captions") is not None:
            values["captions"] = list(params["captions"])
        made = cls(**values)
        made.check()
        return made

    def check(self) -> None:
        """Raise ValueError quoting the first value out of range (train.no_photos without photos)."""
        if not self.photos:
            raise UserFacingError("train.no_photos")
        positive = ("steps_per_photo", "max_steps", "rank", "checkpoint_every", "batch_size")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not (isinstance(self.lr, (int, float)) and 0 < self.lr < 1):
            raise ValueError(f"lr must be within (0, 1), got {self.lr!r}")
        if not isinstance(self.resolution, int) or self.resolution < 8 or self.resolution % 8:
            raise ValueError(f"resolution must be a positive multiple of 8, got {self.resolution!r}")
        if not self.trigger.strip():
            raise ValueError(f"trigger must be a non-empty prompt, got {self.trigger!r}")
        if self.crop not in CROPS:
            raise ValueError(f"crop must be one of {CROPS}, got {self.crop!r}")
        if self.captions is not None:
            if len(self.captions) != len(self.photos):
                raise ValueError(f"captions must be one per photo: {len(self.captions)} for {len(self.photos)}")
            if not all(isinstance(c, str) and c.strip() for c in self.captions):
                raise ValueError("every caption must be a non-empty prompt")

    def prompts(self) -> str | list[str]:
        """The prompt of every photo (one shared prompt without captions)."""
        return list(self.captions) if self.captions is not None else self.trigger

    @property
    def total_steps(self) -> int:
        return min(self.steps_per_photo * len(self.photos), self.max_steps)

    def fingerprint(self) -> str:
        """Hash what decides the training run, so a checkpoint only resumes the same run."""
        decisive = {
            "photos": [[str(p.get("path")), _box_of(p.get("face"))] for p in self.photos],
            "trigger": self.trigger,
            "total": self.total_steps,
            "rank": self.rank,
            "lr": self.lr,
            "resolution": self.resolution,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "expand": self.expand,
        }
        if self.crop != "face" or self.captions is not None:  # identity runs keep their old fingerprints
            decisive.update(crop=self.crop, captions=self.captions)
        return hashlib.sha256(json.dumps(decisive, sort_keys=True, default=str).encode()).hexdigest()


def _box_of(face: Any) -> Any:
    box = face.get("box") if isinstance(face, dict) else getattr(face, "box", None)
    return [float(v) for v in box] if isinstance(box, Sequence) else None


# --- inputs: latents and the prompt embedding --------------------------------------------------


class InputSource(Protocol):
    """Gives training examples: VAE latents and prompt embeddings on the training device."""

    def __len__(self) -> int: ...

    def sample(self, indices: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Return scaled latents (B, 4, h, w) and text embeddings (B, L, D) for `indices`."""


def tokenize(tokenizer: Any, prompt: str | Sequence[str]) -> torch.Tensor:
    """Return the prompt's (or each prompt's) input ids padded to the tokenizer's length, as SD1.5 was trained."""
    return tokenizer(
        [prompt] if isinstance(prompt, str) else list(prompt), padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


@torch.no_grad()
def encode_prompt(text_encoder: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Return the text encoder's last hidden state for the ids, shape (P, L, D) for P prompts."""
    return text_encoder(input_ids.to(text_encoder.device))[0]


@torch.no_grad()
def encode_latent_dist(vae: AutoencoderKL, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the VAE posterior's mean and std (float32) for pixels in [-1, 1]."""
    means, stds = [], []
    for chunk in pixels.split(ENCODE_BATCH):
        dist = vae.encode(chunk.to(vae.device, vae.dtype)).latent_dist
        means.append(dist.mean.float())
        stds.append(dist.std.float())
    return torch.cat(means), torch.cat(stds)


def _texts_for(text: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """One shared prompt for every sample, or each image's own caption."""
    if text.shape[0] == 1:
        return text.expand(len(indices), -1, -1)
    return text[indices.to(text.device)]


def _sample_latents(
    mean: torch.Tensor, std: torch.Tensor, scaling_factor: float, generator: torch.Generator
) -> torch.Tensor:
    # Sampling the posterior each step (as encoding each step would) keeps the VAE's variance.
    eps = torch.randn(mean.shape, generator=generator).to(mean.device)
    return (mean + std * eps) * scaling_factor


@dataclass
class CachedInputs:
    """Latent posteriors and the prompt embedding computed once; each sample costs no encoder."""

    latent_mean: torch.Tensor
    latent_std: torch.Tensor
    text_embeds: torch.Tensor
    scaling_factor: float

    def __len__(self) -> int:
        return self.latent_mean.shape[0]

    def sample(self, indices: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        idx = indices.to(self.latent_mean.device)
        latents = _sample_latents(self.latent_mean[idx], self.latent_std[idx], self.scaling_factor, generator)
        return latents, _texts_for(self.text_embeds, indices)


@dataclass
class LiveInputs:
    """Runs the VAE and the text encoder at every sample (the slow way, kept for comparison)."""

    vae: AutoencoderKL
    text_encoder: torch.nn.Module
    pixels: torch.Tensor
    input_ids: torch.Tensor

    def __len__(self) -> int:
        return self.pixels.shape[0]

    def sample(self, indices: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        mean, std = encode_latent_dist(self.vae, self.pixels[indices])
        latents = _sample_latents(mean, std, self.vae.config.scaling_factor, generator)
        ids = self.input_ids if self.input_ids.shape[0] == 1 else self.input_ids[indices]
        text = encode_prompt(self.text_encoder, ids)
        return latents, text if ids.shape[0] > 1 else text.expand(len(indices), -1, -1)


def cache_inputs(vae: AutoencoderKL, text_encoder: torch.nn.Module, tokenizer: Any, pixels: torch.Tensor,
                 prompt: str | Sequence[str]) -> CachedInputs:
    """Encode every image's latent posterior and the prompt (or each image's caption) once."""
    mean, std = encode_latent_dist(vae, pixels)
    text = encode_prompt(text_encoder, tokenize(tokenizer, prompt))
    return CachedInputs(mean, std, text, float(vae.config.scaling_factor))


def live_inputs(vae: AutoencoderKL, text_encoder: torch.nn.Module, tokenizer: Any, pixels: torch.Tensor,
                prompt: str | Sequence[str]) -> LiveInputs:
    """Return a source that encodes images and the prompt at every step."""
    return LiveInputs(vae, text_encoder, pixels, tokenize(tokenizer, prompt))


# --- the trainer ---------------------------------------------------------------------------------


@dataclass
class _AdapterState:
    """What peft adapters a UNet carried before training, to put back afterwards."""

    names: list[str] = field(default_factory=list)
    active: list[str] = field(default_factory=list)
    disabled: bool = False

    @classmethod
    def capture(cls, unet: UNet2DConditionModel) -> _AdapterState:
        names = adapter_names(unet)
        if not names:
            return cls()
        layers = [m for m in unet.modules() if isinstance(m, BaseTunerLayer)]
        disabled = bool(layers) and all(m.disable_adapters for m in layers)
        return cls(names, list(unet.active_adapters()), disabled)


def adapter_names(unet: UNet2DConditionModel) -> list[str]:
    """Return the names of the peft adapters loaded on a UNet (none on a clean base)."""
    if not getattr(unet, "_hf_peft_config_loaded", False):
        return []
    return list(getattr(unet, "peft_config", None) or {})


class LoraTrainer:
    """Adds a LoRA adapter to a UNet and trains it in place, one optimizer step per call.

    Use as a context manager: leaving it removes the adapter and restores the UNet's previous
    adapters, mode, gradient flags and checkpointing, even after an error or a cancel.
    """

    def __init__(self, unet: UNet2DConditionModel, noise_scheduler: DDPMScheduler, *, rank: int, lr: float,
                 seed: int, mixed_precision: torch.dtype | None = None,
                 gradient_checkpointing: bool = False) -> None:
        self.unet = unet
        self.noise_scheduler = noise_scheduler
        self.device = unet.device
        self.generator = torch.Generator().manual_seed(seed)
        self.step_count = 0
        self.losses: list[float] = []
        self._previous = _AdapterState.capture(unet)
        self._checkpointing_before = unet.is_gradient_checkpointing
        self._gradient_checkpointing = gradient_checkpointing
        if TRAIN_ADAPTER in adapter_names(unet):
            logger.warning("removing a training adapter left on the UNet by an aborted run")
            unet.delete_adapters(TRAIN_ADAPTER)
        unet.requires_grad_(False)
        config = LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                            target_modules=list(TARGET_MODULES))
        self._config = config
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # the adapter's initial weights follow the job's seed
            unet.add_adapter(copy.deepcopy(config), adapter_name=TRAIN_ADAPTER)
        try:
            if unet.dtype != torch.float32:
                cast_training_params(unet, dtype=torch.float32)  # fp32 master weights for the LoRA only
            self.named_params = self._adapter_params()
            self.optimizer = torch.optim.AdamW([p for _, p in self.named_params], lr=lr, weight_decay=WEIGHT_DECAY)
            use_amp = mixed_precision is not None and self.device.type == "cuda"
            self.autocast_dtype = mixed_precision if use_amp else None
            self.scaler = torch.amp.GradScaler("cuda") if self.autocast_dtype == torch.float16 else None
            self._set_training_mode()
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> LoraTrainer:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    @property
    def params(self) -> list[torch.nn.Parameter]:
        return [p for _, p in self.named_params]

    def _adapter_params(self) -> list[tuple[str, torch.nn.Parameter]]:
        marker = f".{TRAIN_ADAPTER}."
        found = [(n, p) for n, p in self.unet.named_parameters() if marker in n]
        if not found:
            raise RuntimeError(f"adapter {TRAIN_ADAPTER!r} has no parameters on this UNet")
        return found

    def _set_training_mode(self) -> None:
        self.unet.set_adapter(TRAIN_ADAPTER)
        for param in self.params:
            param.requires_grad_(True)
        if self._gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        self.unet.train()

    def train_step(self, source: InputSource, batch_size: int = 1) -> float:
        """Run one optimizer step on a random batch; return its loss."""
        g = self.generator
        indices = torch.randint(len(source), (batch_size,), generator=g)
        latents, text = source.sample(indices, g)
        noise = torch.randn(latents.shape, generator=g).to(self.device)
        num_timesteps = self.noise_scheduler.config.num_train_timesteps
        timesteps = torch.randint(num_timesteps, (batch_size,), generator=g).to(self.device)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        if self.noise_scheduler.config.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        autocast = (torch.autocast(self.device.type, dtype=self.autocast_dtype)
                    if self.autocast_dtype is not None else nullcontext())
        # SDXL's UNet also takes the pooled prompt and the size/crop "time ids" (facechain_core.train_lora_sdxl).
        added = getattr(source, "added_cond_kwargs", None)
        extra = {"added_cond_kwargs": added(batch_size)} if added is not None else {}
        with autocast:
            pred = self.unet(noisy.to(self._input_dtype), timesteps, text, **extra).sample
        loss = F.mse_loss(pred.float(), target.float())
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, MAX_GRAD_NORM)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        value = float(loss.detach())
        self.step_count += 1
        self.losses.append(value)
        return value

    @property
    def _input_dtype(self) -> torch.dtype:
        return torch.float32 if self.autocast_dtype is not None else self.unet.dtype

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Deactivate the adapter and put the UNet in inference mode while other work borrows it."""
        # No adapter active rather than disable_adapters(): peft's "disabled" flag would also
        # silence a user LoRA that the borrowing job loads and activates.
        self.unet.set_adapter([])
        self.unet.eval()
        if self._gradient_checkpointing:
            self.unet.disable_gradient_checkpointing()
        try:
            yield
        finally:
            self._reattach_if_lost()
            self.unet.enable_adapters()
            self._set_training_mode()

    def _reattach_if_lost(self) -> None:
        """Put the adapter back if a borrower unloaded it, moving weights and optimizer state over."""
        present = TRAIN_ADAPTER in adapter_names(self.unet)
        if present:
            current = [p for _, p in self._adapter_params()]
            if len(current) == len(self.named_params) and all(p is q for p, q in zip(current, self.params)):
                return
        logger.warning("training adapter %s was removed during a pause; restoring it", TRAIN_ADAPTER)
        if present:
            self.unet.delete_adapters(TRAIN_ADAPTER)
        with torch.random.fork_rng(devices=[]):  # its fresh weights are overwritten below anyway
            self.unet.add_adapter(copy.deepcopy(self._config), adapter_name=TRAIN_ADAPTER)
        if self.unet.dtype != torch.float32:
            cast_training_params(self.unet, dtype=torch.float32)
        new_params = self._adapter_params()
        old_by_name = dict(self.named_params)
        with torch.no_grad():
            for name, param in new_params:
                old = old_by_name[name]
                param.copy_(old)
                if old in self.optimizer.state:
                    self.optimizer.state[param] = self.optimizer.state.pop(old)
        self.optimizer.param_groups[0]["params"] = [p for _, p in new_params]
        self.named_params = new_params

    def state_dict(self) -> dict[str, Any]:
        """Return everything needed to resume exactly: LoRA, optimizer, RNG, step, losses."""
        return {
            "step": self.step_count,
            "losses": list(self.losses),
            "lora": {name: p.detach().cpu().clone() for name, p in self.named_params},
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state from ``state_dict``; raise ValueError if it belongs to another adapter."""
        lora = state["lora"]
        names = {n for n, _ in self.named_params}
        if set(lora) != names:
            raise ValueError(f"checkpoint holds {len(lora)} LoRA tensors, this adapter has {len(names)}")
        with torch.no_grad():
            for name, param in self.named_params:
                param.copy_(lora[name])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.generator.set_state(state["generator"])
        self.step_count = int(state["step"])
        self.losses = [float(v) for v in state["losses"]]

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        """Return the adapter's weights under diffusers' key names."""
        peft_state = get_peft_model_state_dict(self.unet, adapter_name=TRAIN_ADAPTER)
        return {k: v.detach().float().cpu() for k, v in convert_state_dict_to_diffusers(peft_state).items()}

    def adapter_metadata(self) -> dict[str, Any]:
        """Return the LoRA config (rank, alpha, targets) to store beside the weights."""
        return {**self.unet.peft_config[TRAIN_ADAPTER].to_dict(), "base_model_name_or_path": None}

    def close(self) -> None:
        """Remove the training adapter and restore the UNet as it was found."""
        unet = self.unet
        others = [name for name in adapter_names(unet) if name != TRAIN_ADAPTER]
        if TRAIN_ADAPTER in adapter_names(unet):
            if others:
                unet.delete_adapters(TRAIN_ADAPTER)
            else:
                unet.unload_lora()  # drop the peft wrappers too: the base is exactly as loaded
        active = [name for name in self._previous.active if name in others]
        if active:
            unet.set_adapter(active)
            if self._previous.disabled:
                unet.disable_adapters()
        if unet.is_gradient_checkpointing != self._checkpointing_before:
            if self._checkpointing_before:
                unet.enable_gradient_checkpointing()
            else:
                unet.disable_gradient_checkpointing()
        unet.requires_grad_(False)
        unet.eval()


# --- checkpoints ---------------------------------------------------------------------------------


def checkpoint_path(out_dir: Path, folder: str = CHECKPOINT_DIR) -> Path:
    """Return where a training run in out_dir keeps its checkpoint (`folder`: one per base family)."""
    return Path(out_dir) / folder / CHECKPOINT_FILE


def save_checkpoint(path: Path, fingerprint: str, state: dict[str, Any]) -> None:
    """Write a checkpoint atomically: a crash mid-write leaves the previous one intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        torch.save({"version": CHECKPOINT_VERSION, "fingerprint": fingerprint, **state}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def load_checkpoint(path: Path, fingerprint: str) -> dict[str, Any] | None:
    """Return the checkpoint at path if it belongs to this run, else None (and drop a stale one)."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file must not block a fresh start
        logger.warning("ignoring unreadable training checkpoint %s: %s", path, exc)
        return None
    if state.get("version") != CHECKPOINT_VERSION or state.get("fingerprint") != fingerprint:
        logger.info("training checkpoint %s is from another run; starting over", path)
        return None
    return state


def remove_checkpoint(out_dir: Path, folder: str = CHECKPOINT_DIR) -> None:
    """Delete the checkpoint folder of out_dir, if any."""
    shutil.rmtree(Path(out_dir) / folder, ignore_errors=True)


# --- the pipeline --------------------------------------------------------------------------------


def weights_variant(folder: Path) -> str | None:
    """Return "fp16" when the folder holds only fp16-variant weights (as the manifest pulls SD1.5)."""
    unet = folder / "unet"
    plain = any(unet.glob("diffusion_pytorch_model.safetensors")) or any(unet.glob("diffusion_pytorch_model.bin"))
    return "fp16" if not plain and any(unet.glob("diffusion_pytorch_model.fp16.*")) else None


def sd15_pull_command() -> str:
    """Return the operator's command that installs the SD1.5 base for training."""
    manifest = load_manifest()
    entry = manifest.get("sd15")
    features = [FEATURE] if FEATURE in entry.features else list(entry.features[:1])
    return manifest.pull_command(features)


def loss_curve(losses: Sequence[float], points: int = LOSS_CURVE_POINTS) -> list[float]:
    """Summarise per-step losses as the means of up to `points` equal spans."""
    if not losses:
        return []
    points = min(points, len(losses))
    bounds = [round(i * len(losses) / points) for i in range(points + 1)]
    return [round(sum(losses[a:b]) / (b - a), 5) for a, b in zip(bounds, bounds[1:])]


def _final_loss(losses: Sequence[float]) -> float | None:
    tail = losses[-FINAL_LOSS_WINDOW:]
    return round(sum(tail) / len(tail), 5) if tail else None


class TrainLoraPipeline:
    """Job "train_lora": selfies -> the user's identity LoRA (see the module docstring).

    The base lives in the worker's ``ResidentPipelines`` under its own key: the portrait base
    carries IP-Adapter FaceID in its UNet, which plain denoising training cannot run through.
    Settings: the manifest model "sd15" (``model_paths`` may override it) and optional ``train``
    defaults for the job params (``steps_per_photo``, ``max_steps``, ``resolution``, ``checkpoint_every``...).
    """

    kind = "train_lora"
    # What a subclass for another base family or purpose changes (train_lora_sdxl, style_maker).
    base_name = "sd15"  # the manifest model trained on
    feature = FEATURE
    resident_key = RESIDENT_KEY
    weight_name = WEIGHT_NAME
    checkpoint_dir = CHECKPOINT_DIR
    settings_key = "train"  # the operator's defaults for the job params (settings["train"])

    def __init__(self) -> None:
        self._context: PipelineContext | None = None
        self._resident: ResidentPipelines | None = None
        self._path: Path | None = None
        self.dtype = torch.float32
        self.mixed_precision: torch.dtype | None = None
        self.gradient_checkpointing = False

    def load(self, context: PipelineContext) -> None:
        """Make the SD1.5 base resident; raise ModelNotInstalled when it is absent."""
        device = torch.device(context.device)
        on_gpu = device.type == "cuda"
        # Frozen weights in the worker's half precision on GPU; fp32 on CPU, where half is slow.
        self.dtype = DTYPES.get(context.dtype, torch.float32) if on_gpu else torch.float32
        self.mixed_precision = self.dtype if self.dtype != torch.float32 else None
        self.gradient_checkpointing = on_gpu
        self._path = context.model_path(self.base_name, self.feature)
        self._context = context
        budget = context.memory_budget_mb * 2**20
        self._resident = context.shared.setdefault(SHARED_KEY, ResidentPipelines(budget))
        self.base()

    def base(self) -> StableDiffusionPipeline:
        """Return the resident SD1.5 base, loading it again if the worker evicted it."""
        if self._resident is None:
            raise RuntimeError("TrainLoraPipeline used before load")
        return self._resident.get(self.resident_key, self._load_base)

    @property
    def unet(self) -> UNet2DConditionModel:
        return self.base().unet

    def _load_base(self) -> StableDiffusionPipeline:
        assert self._context is not None and self._path is not None
        path = self._path
        if not (path / "model_index.json").is_file():
            raise ModelNotInstalled(model="sd15", feature=FEATURE, pull_command=sd15_pull_command())
        sd = StableDiffusionPipeline.from_pretrained(
            path, dtype=self.dtype, variant=weights_variant(path), local_files_only=True, safety_checker=None,
            requires_safety_checker=False)
        sd.to(self._context.device)
        sd.set_progress_bar_config(disable=True)
        for module in (sd.unet, sd.vae, sd.text_encoder):
            module.requires_grad_(False)
            module.eval()
        logger.info("train_lora loaded %s on %s (%s)", path, self._context.device, self.dtype)
        return sd

    def run(self, params: dict[str, Any], progress: Progress) -> JobResult:
        """Train, checkpointing and yielding as it goes; return the LoRA file and a loss summary."""
        sd = self.base()
        noise_scheduler = DDPMScheduler.from_config(sd.scheduler.config)
        # 1. Check the parameters: the operator's defaults (settings["train"]) under the job's own.
        assert self._context is not None
        known = {f.name for f in dataclasses.fields(TrainParams)}
        merged = {"trigger": DEFAULT_TRIGGER, **self.job_defaults(), **params}
        job = TrainParams.from_dict({k: v for k, v in merged.items() if k in known})
        total = job.total_steps
        progress(0, total, STAGE_PREPARING)
        # 2. Crop the faces, or the whole pictures for a style (with mirrored copies).
        if job.crop == "whole":
            crops = prepare_whole_crops(job.photos, job.resolution)
        else:
            crops = prepare_crops(job.photos, job.resolution, job.expand)
        pixels = with_flips(to_pixels(crops))
        prompts = job.prompts()
        if not isinstance(prompts, str):
            prompts = prompts + prompts  # the mirrored copies keep their captions
        # 3. Encode the latents and the prompts once, unless asked not to.
        source = self.make_source(sd, pixels, prompts, job)
        # 4. Add the adapter and resume from a checkpoint of the same run, if one survived.
        ckpt = checkpoint_path(job.out_dir, self.checkpoint_dir)
        fingerprint = job.fingerprint()
        with LoraTrainer(sd.unet, noise_scheduler, rank=job.rank, lr=job.lr, seed=job.seed,
                         mixed_precision=self.mixed_precision,
                         gradient_checkpointing=self.gradient_checkpointing) as trainer:
            state = load_checkpoint(ckpt, fingerprint)
            if state is not None:
                trainer.load_state_dict(state)
                logger.info("train_lora resumes %s at step %d of %d", job.out_dir, trainer.step_count, total)
            resumed_from = trainer.step_count
            if resumed_from:
                progress(resumed_from, total, STAGE_TRAINING)
            # 5. Train: checkpoint, report, and let short jobs through at each checkpoint.
            self._train(trainer, source, job, progress, fingerprint)
            # 6. Save the LoRA in diffusers' format.
            progress(total, total, STAGE_SAVING)
            weights = self._save_weights(trainer, job.out_dir)
            losses = trainer.losses
        # 7. The run is complete: its checkpoint is no longer needed.
        remove_checkpoint(job.out_dir, self.checkpoint_dir)
        meta = {
            "steps": total,
            "final_loss": _final_loss(losses),
            "resumed_from": resumed_from,
            "loss_curve": loss_curve(losses),
            "photos": len(job.photos),
            "rank": job.rank,
            "trigger": job.trigger,
            "weight_name": self.weight_name,
            "family": self.base_name,
        }
        logger.info("train_lora done %s: %d steps, final loss %s", job.out_dir, total, meta["final_loss"])
        return JobResult(files=[weights], meta=meta)

    def _train(self, trainer: LoraTrainer, source: InputSource, job: TrainParams, progress: Progress,
               fingerprint: str) -> None:
        total = job.total_steps
        ckpt = checkpoint_path(job.out_dir, self.checkpoint_dir)
        saved_at = trainer.step_count
        while trainer.step_count < total:
            trainer.train_step(source, job.batch_size)
            step = trainer.step_count
            if step % job.checkpoint_every == 0 or step == total:
                save_checkpoint(ckpt, fingerprint, trainer.state_dict())
                saved_at = step
            progress(step, total, STAGE_TRAINING)
            if saved_at == step and step < total:
                with trainer.paused():
                    progress.yield_point()

    def job_defaults(self) -> dict[str, Any]:
        """The operator's defaults for this kind's job params."""
        assert self._context is not None
        return dict(self._context.settings.get(self.settings_key, {}))

    def make_source(self, sd: Any, pixels: torch.Tensor, prompts: str | list[str], job: TrainParams) -> InputSource:
        """The training examples: latents and the prompts encoded once (or at every step, when asked)."""
        make = cache_inputs if job.cache_latents else live_inputs
        return make(sd.vae, sd.text_encoder, sd.tokenizer, pixels, prompts)

    def _save_weights(self, trainer: LoraTrainer, out_dir: Path) -> Path:
        out_dir.mkdir(parents=True, exist_ok=True)
        type(self.base()).save_lora_weights(
            save_directory=out_dir,
            unet_lora_layers=trainer.lora_state_dict(),
            weight_name=self.weight_name,
            safe_serialization=True,
            unet_lora_adapter_metadata=trainer.adapter_metadata(),
        )
        return out_dir / self.weight_name

    def close(self) -> None:
        """Evict the base from the worker's resident cache."""
        if self._resident is not None:
            self._resident.evict(self.resident_key)
        self._resident = None
