"""Typed settings from a TOML file, with secrets from the environment.

``load_config(path)`` validates every key; an error names the key (``scheduler.gpus: ...``).
Tokens are ``SecretStr``: they never show in a repr, a log line or an error.
"""
from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from facechain_core.accelerators import check_fast_settings
from facechain_core.numbers import ascii_int

TELEGRAM_TOKEN_ENV = "FACECHAIN_TELEGRAM_TOKEN"
TELEGRAM_WEBHOOK_SECRET_ENV = "FACECHAIN_TELEGRAM_WEBHOOK_SECRET"
DISCORD_TOKEN_ENV = "FACECHAIN_DISCORD_TOKEN"


class ConfigError(Exception):
    """The configuration is invalid; the message names each bad key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TelegramSettings(_Section):
    token: SecretStr = SecretStr("")
    base_url: str = "https://api.telegram.org/bot"
    base_file_url: str = "https://api.telegram.org/file/bot"
    # Polling timeout in seconds for getUpdates (long polling).
    poll_timeout: float = Field(default=10.0, ge=0)
    # How many times a request is retried after a 429 "retry_after".
    max_retries: int = Field(default=3, ge=0)
    # Messages (sends and edits) per group per period; more wait in that group's queue, in order.
    group_max_rate: float = Field(default=20, gt=0)
    group_time_period: float = Field(default=60, gt=0)
    # Seconds Telegram may cache a user's inline results ("@bot" in any chat); they are personal.
    inline_cache_s: int = Field(default=10, ge=0)
    # Seconds to wait for the Bot API to connect, take an upload or answer (a send past it is tried again
    # later); unset: python-telegram-bot's own (5 s, 20 s for uploads).
    request_timeout_s: float | None = Field(default=None, gt=0)
    # Webhooks instead of polling (behind a reverse proxy): the public HTTPS URL Telegram posts updates to;
    # empty: long polling. The listener serves the URL's path on webhook_listen:webhook_port.
    webhook_url: str = ""
    webhook_listen: str = "127.0.0.1"
    webhook_port: int = Field(default=8443, ge=1, le=65535)
    # Sent by Telegram in every webhook request and checked (1-256 of A-Z a-z 0-9 _ -); required with webhooks.
    webhook_secret_token: SecretStr = SecretStr("")
    # The largest file the bot may upload, in MB (Telegram's Bot API: 50; a local Bot API server: 2000).
    upload_limit_mb: float = Field(default=50.0, gt=0)

    @property
    def enabled(self) -> bool:
        return bool(self.token.get_secret_value())

    @field_validator("webhook_secret_token")
    @classmethod
    def _secret_token_shape(cls, value: SecretStr) -> SecretStr:
        text = value.get_secret_value()
        if text and not re.fullmatch(r"[A-Za-z0-9_-]{1,256}", text):
            raise ValueError("must be 1-256 characters of A-Z, a-z, 0-9, _ and -")
        return value

    @model_validator(mode="after")
    def _webhook_needs_a_secret(self) -> TelegramSettings:
        if self.webhook_url and not self.webhook_secret_token.get_secret_value():
            raise ValueError(f"webhook_url needs webhook_secret_token (or {TELEGRAM_WEBHOOK_SECRET_ENV})")
        if self.webhook_url and not self.webhook_url.startswith(("https://", "http://")):
            raise ValueError("webhook_url must be an https:// URL")
        return self


class DiscordSettings(_Section):
    token: SecretStr = SecretStr("")
    # Guild ids where slash commands are synced instantly (global sync can take an hour).
    guild_ids: list[int] = []
    # Empty: every server. Otherwise only these guild ids (DMs are always allowed).
    allowed_guilds: list[int] = []
    # Empty: every channel. Otherwise only these channel ids in servers (DMs are always allowed).
    allowed_channels: list[int] = []
    # The largest file the bot may attach, in MiB (10 by default; more in boosted servers).
    upload_limit_mib: float = Field(default=10.0, gt=0)

    @property
    def enabled(self) -> bool:
        return bool(self.token.get_secret_value())


class KindOverride(_Section):
    timeout_s: float | None = Field(default=None, gt=0)
    max_tries: int | None = Field(default=None, ge=1)


class PlacementRule(_Section):
    """Pins job kinds to some GPUs: a kind named by any rule runs only on a slot matching one of its rules."""

    kinds: list[str] = Field(min_length=1)
    # GPU indexes on their machine (empty: any); a CPU worker matches no rule that names GPUs.
    gpus: list[int] = []
    # Least GPU memory in MB (0: any); a GPU whose memory is unknown does not match a rule that asks.
    min_memory_mb: int = Field(default=0, ge=0)
    # Labels the slot must carry (Ray: its node's labels, e.g. `ray start --labels tier=big`).
    labels: dict[str, str] = {}


class SchedulerSettings(_Section):
    # CUDA device indexes, one worker process each; empty: one CPU worker.
    gpus: list[int] = []
    # Where worker processes run: "local" (children of the bot, one per GPU above) or "ray"
    # (one actor per GPU of a Ray cluster; `pip install '.[ray]'`).
    backend: Literal["local", "ray"] = "local"
    # Ray: "auto" (the cluster this machine joined), "HEAD_IP:6379", "ray://head:10001", or empty for a local instance.
    ray_address: str = ""
    # Ray: the resource each worker actor takes one unit of ("GPU" on a real cluster).
    ray_gpu_resource: str = "GPU"
    ray_namespace: str = "facechain"
    # Ray: only nodes carrying all these labels host workers (empty: every node with the resource).
    ray_node_labels: dict[str, str] = {}
    # Ray: MB of job inputs (selfies, identities, user LoRAs) each worker keeps on its node (LRU).
    ray_cache_mb: int = Field(default=2048, ge=0)
    # MB the resident-pipeline LRU of each worker may hold (0: no limit); the GPU's own memory bounds it too.
    memory_budget_mb: int = Field(default=0, ge=0)
    # Which GPUs each kind may use (both backends); see PlacementRule.
    placement: list[PlacementRule] = []
    queue_max: int = Field(default=200, ge=1)
    user_max_queued: int = Field(default=3, ge=1)
    # Seconds a running job gets after SIGTERM before it is put back in the queue.
    shutdown_grace_s: float = Field(default=30.0, ge=0)
    # Minimum seconds between two edits of a progress message.
    progress_interval_s: float = Field(default=2.0, ge=0)
    # Seconds before the second try to deliver a result that failed to send; each further wait doubles,
    # up to delivery_max_backoff_s. Tries go on across restarts for as long as retention keeps the result.
    delivery_retry_s: float = Field(default=30.0, gt=0)
    delivery_max_backoff_s: float = Field(default=600.0, gt=0)
    # Most samples (candidate pictures) of several users' jobs in one denoising pass; 1: batching off.
    batch_max: int = Field(default=8, ge=1)
    # Per job kind: timeout and tries, overriding the built-in table.
    kinds: dict[str, KindOverride] = {}


class LimitSettings(_Section):
    max_upload_mb: float = Field(default=20.0, gt=0)
    max_pixels: int = Field(default=50_000_000, gt=0)
    # Commands a user may send per minute (0: no limit).
    commands_per_minute: int = Field(default=20, ge=0)
    # Selfies kept per user; the oldest is replaced.
    max_selfies: int = Field(default=10, ge=1)
    # Seconds a pending input ("send me the outfit photo") waits.
    pending_input_ttl_s: float = Field(default=600.0, gt=0)


class AccessSettings(_Section):
    # User keys ("telegram:123") allowed admin commands.
    admins: list[str] = []
    # Empty: everyone may use the bot. Otherwise only these user keys.
    allowed_users: list[str] = []
    # Empty: every chat. Otherwise only these chat keys ("telegram:-100123").
    allowed_chats: list[str] = []


class SelfieSettings(_Section):
    detector: Literal["yunet", "scrfd"] = "yunet"
    # File under models_dir (or an absolute path).
    detector_model: str = "yunet_s_640_640.onnx"
    min_face_px: int = Field(default=64, ge=16)


class MetricsSettings(_Section):
    # Serve Prometheus metrics at http://<address>/metrics (off by default).
    enabled: bool = False
    # "host:port"; port 0 picks a free one (tests).
    address: str = "127.0.0.1:9464"

    @field_validator("address")
    @classmethod
    def _check_address(cls, value: str) -> str:
        parse_address(value)
        return value


def parse_address(address: str) -> tuple[str, int]:
    """Splits ``host:port`` (``[::1]:9464`` for IPv6); raises ValueError naming the bad part."""
    host, sep, port = address.rpartition(":")
    number = ascii_int(port)
    if not sep or number is None or not 0 <= number <= 65535:
        raise ValueError(f"must be host:port with a port of 0 to 65535, got {address!r}")
    host = host.strip("[]") or "0.0.0.0"
    return host, number


class ImagineSettings(_Section):
    # Check /imagine prompts with the text classifier too, after the word lists, where it is installed
    # (`facechain-bot models pull imagine-classifier`); it loads in the bot process on the first /imagine.
    classifier: bool = True
    # The probability of a refused category (sexual, minors, violence, hate, self-harm) that refuses a prompt.
    classifier_threshold: float = Field(default=0.6, gt=0, le=1)


class DuoSettings(_Section):
    # How long each partner has to answer a /duo or /group request; no answer in time means nothing is made.
    consent_timeout_s: float = Field(default=600.0, gt=0)


class StylesSettings(_Section):
    # Who may make a style from example pictures with /makestyle (in a private chat): "admins" (the
    # [access] admins), "everyone" (a user's style stays private to them until an admin publishes it) or "off".
    makestyle: Literal["admins", "everyone", "off"] = "admins"
    # Example pictures a style is trained on.
    min_examples: int = Field(default=5, ge=1)
    max_examples: int = Field(default=30, ge=1)
    # Pixels the shorter side of an example needs at least.
    min_side: int = Field(default=384, ge=8)
    # Perceptual-hash distance (of 64 bits) at or below which two examples count as the same picture.
    duplicate_distance: int = Field(default=6, ge=0, le=64)
    # A face other than the maker's in more examples than this refuses the set (a style is not a likeness).
    max_same_face: int = Field(default=3, ge=1)
    # A photo of a person whose portrait previews every new style (beside the maker's own); unset: the maker's only.
    reference_photo: Path | None = None

    @field_validator("max_examples")
    @classmethod
    def _check_range(cls, value: int, info: Any) -> int:
        low = info.data.get("min_examples", 1)
        if value < low:
            raise ValueError(f"must be at least min_examples ({low}), got {value}")
        return value


class RetentionSettings(_Section):
    # Days each kind of user data is kept (0: until the user deletes it), counted from when it was made.
    results_days: float = Field(default=30, ge=0)
    selfies_days: float = Field(default=90, ge=0)
    identities_days: float = Field(default=90, ge=0)
    loras_days: float = Field(default=90, ge=0)
    # Hours a file in a user's folder that no row names is kept: inputs of jobs that failed, were cancelled
    # or never got the file they asked for, checkpoints of a stopped training, photos behind style buttons.
    inputs_hours: float = Field(default=24, gt=0)
    # Seconds between two cleanups of expired data (the first runs when the service starts).
    sweep_interval_s: float = Field(default=3600, gt=0)

    def days(self) -> dict[str, float]:
        """Days kept per data class (``bot.storage.DATA_CLASSES``); 0: no expiry."""
        return {"results": self.results_days, "selfies": self.selfies_days,
                "identities": self.identities_days, "loras": self.loras_days}


class TrainingSettings(_Section):
    # The base families /train trains a personal LoRA for ("sd15", "sdxl"), one job each; a style of a
    # family without the user's LoRA runs train-free and says so.
    train_families: list[Literal["sd15", "sdxl"]] = Field(default=["sd15"], min_length=1)

    @field_validator("train_families")
    @classmethod
    def _distinct(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"each family once, got {value}")
        return value


# Jobs one user may start per UTC day, by job kind (admins are exempt); 0: no limit.
DEFAULT_QUOTAS: dict[str, int] = {"portrait": 20, "cartoon": 40, "train": 2, "train_sdxl": 2, "style_train": 2,
                                 "duo": 10, "duo_template": 10, "enhance": 40}


class Settings(_Section):
    data_dir: Path = Path("data")
    models_dir: Path = Path("models")
    # Style definitions, one TOML file each; default: the `styles/` folder of this checkout.
    styles_dir: Path = Path(__file__).resolve().parent.parent / "styles"
    language: Literal["en", "zh"] = "en"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    # "text" (one human-readable line per record) or "json" (one JSON object per line).
    log_format: Literal["text", "json"] = "text"
    telegram: TelegramSettings = TelegramSettings()
    discord: DiscordSettings = DiscordSettings()
    scheduler: SchedulerSettings = SchedulerSettings()
    limits: LimitSettings = LimitSettings()
    access: AccessSettings = AccessSettings()
    selfie: SelfieSettings = SelfieSettings()
    metrics: MetricsSettings = MetricsSettings()
    retention: RetentionSettings = RetentionSettings()
    imagine: ImagineSettings = ImagineSettings()
    duo: DuoSettings = DuoSettings()
    styles: StylesSettings = StylesSettings()
    training: TrainingSettings = TrainingSettings()
    # Jobs per user per UTC day by job kind; kinds not named keep DEFAULT_QUOTAS, 0: no limit.
    quotas: dict[str, int] = dict(DEFAULT_QUOTAS)
    # Model name (as in facechain_core/models.toml) -> your own local copy, used instead of
    # models_dir/<manifest path>; it only has to exist (no size or hash check).
    model_paths: dict[str, Path] = {}
    # Settings handed to every pipeline in the workers: model path overrides and tuning knobs
    # (see config.example.toml). Keys are documented by the pipelines that read them.
    pipeline: dict[str, Any] = {}
    # A fixed seed makes /style reproducible (same selfies, style and seed: same images).
    portrait_seed: int | None = None

    @field_validator("quotas")
    @classmethod
    def _merge_quotas(cls, value: dict[str, int]) -> dict[str, int]:
        negative = sorted(kind for kind, limit in value.items() if limit < 0)
        if negative:
            raise ValueError(f"a quota is a number of jobs (0: no limit), got a negative one for {negative}")
        return {**DEFAULT_QUOTAS, **value}

    @field_validator("pipeline")
    @classmethod
    def _check_fast_mode(cls, value: dict[str, Any]) -> dict[str, Any]:
        check_fast_settings(value)  # fast_mode, fast_auto_queue, fast_accelerator
        return value

    @field_validator("data_dir", "models_dir", "styles_dir")
    @classmethod
    def _expand(cls, value: Path) -> Path:
        return value.expanduser()

    @property
    def db_path(self) -> Path:
        return self.data_dir / "facechain.sqlite3"

    @property
    def heartbeat_path(self) -> Path:
        return self.data_dir / "heartbeat.json"

    def secrets(self) -> list[str]:
        """Every secret value, for the log redaction filter."""
        return [s for s in (self.telegram.token.get_secret_value(), self.discord.token.get_secret_value(),
                            self.telegram.webhook_secret_token.get_secret_value()) if s]


def _format_errors(error: ValidationError, source: str) -> str:
    lines = []
    for item in error.errors():
        key = ".".join(str(p) for p in item["loc"]) or "(root)"
        lines.append(f"{key}: {item['msg']}")
    return f"invalid configuration in {source}:\n  " + "\n  ".join(lines)


def load_config(path: Path | None = None, environ: dict[str, str] | None = None) -> Settings:
    """Reads `path` (optional) and applies token overrides from the environment."""
    env = os.environ if environ is None else environ
    raw: dict = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise ConfigError(f"config file not found: {path}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path} is not valid TOML: {exc}") from exc
    for section, var in (("telegram", TELEGRAM_TOKEN_ENV), ("discord", DISCORD_TOKEN_ENV)):
        if env.get(var):
            raw.setdefault(section, {})["token"] = env[var]
    if env.get(TELEGRAM_WEBHOOK_SECRET_ENV):
        raw.setdefault("telegram", {})["webhook_secret_token"] = env[TELEGRAM_WEBHOOK_SECRET_ENV]
    try:
        return Settings.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, source)) from None
