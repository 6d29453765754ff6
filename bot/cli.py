"""The `facechain-bot` command line. Library code raises; only this module exits."""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from bot.config import DISCORD_TOKEN_ENV, TELEGRAM_TOKEN_ENV, ConfigError, Settings, load_config
from bot.ops.logredact import redacted_output
from facechain_core.errors import UserFacingError

log = logging.getLogger("facechain_bot")

HEARTBEAT_MAX_AGE_S = 60.0
# A worker must have answered (progress, result or a pong to the heartbeat's ping) within this.
WORKER_MAX_SILENCE_S = 60.0
CONFIG_HELP = "TOML config (see config.example.toml)"


def _settings(args: argparse.Namespace) -> Settings:
    settings = load_config(args.config)
    from bot.ops.logsetup import configure_logging

    configure_logging(settings)
    return settings


def cmd_run(args: argparse.Namespace) -> int:
    """Runs the bot until SIGINT/SIGTERM."""
    from bot.app import run_service

    settings = _settings(args)
    if not (settings.telegram.enabled or settings.discord.enabled):
        raise ConfigError(
            "no chat platform configured: set FACECHAIN_TELEGRAM_TOKEN (or [telegram] token) "
            "and/or FACECHAIN_DISCORD_TOKEN"
        )

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await run_service(settings, stop)

    asyncio.run(main())
    return 0


def health_problem(beat: dict, now: float, max_age_s: float, max_silence_s: float) -> str | None:
    """Why the service described by heartbeat `beat` is unhealthy (one line), or None."""
    age = now - float(beat.get("time", 0))
    if age > max_age_s:
        return f"heartbeat {age:.0f} s old (the service is stopped or stuck)"
    if beat.get("accepting") is False:
        return "the service is shutting down"
    workers = beat.get("worker_states")
    if workers is None:  # a heartbeat from before per-worker states
        return None if beat.get("workers_alive", 1) > 0 else "no worker process is running"
    for worker in workers:
        name = f"worker {worker.get('index')} ({worker.get('device')})"
        if not worker.get("alive"):
            return f"{name} is not running (it is being restarted)"
        silence = now - float(worker.get("heard") or 0)
        if silence > max_silence_s:
            return f"{name} silent for {silence:.0f} s"
    return None


def cmd_health(args: argparse.Namespace) -> int:
    """Exits 0 while the service's heartbeat is fresh and every worker answered recently, else 1."""
    settings = load_config(args.config)
    try:
        beat = json.loads(settings.heartbeat_path.read_text())
    except (OSError, ValueError):
        print(f"unhealthy: no heartbeat at {settings.heartbeat_path} (is the service running?)")
        return 1
    now = time.time()
    problem = health_problem(beat, now, args.max_age, args.max_silence)
    if problem is not None:
        print(f"unhealthy: {problem}")
        return 1
    workers = beat.get("worker_states") or []
    print(f"healthy: heartbeat {now - float(beat['time']):.0f} s old, {len(workers)} worker(s) answering, "
          f"{beat.get('queued', 0)} queued, {beat.get('running', 0)} running")
    return 0


def cmd_backup(args: argparse.Namespace) -> int:
    """Writes a consistent backup of the database and the user folders, also while the service runs."""
    from bot.ops.backup import BackupError, backup

    settings = _settings(args)
    try:
        summary = asyncio.run(backup(settings.data_dir, settings.db_path, args.out))
    except BackupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"backed up {summary.describe()}")
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    """Restores a backup into the configured (empty) data dir."""
    from bot.ops.backup import BackupError, restore

    settings = _settings(args)
    try:
        summary = asyncio.run(restore(args.archive, settings.data_dir, settings.db_path))
    except BackupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"restored {summary.describe()} into {settings.data_dir}")
    return 0


def cmd_check_selfie(args: argparse.Namespace) -> int:
    """Prints the selfie verdict for each photo; exits 1 if any was rejected."""
    from handlers.messages import t
    from handlers.selfie_check import lazy_selfie_checker

    settings = _settings(args)
    check = lazy_selfie_checker(settings)
    rejected = 0
    for path in args.photos:
        try:
            result = check(Path(path).read_bytes())
            x, y, w, h = result.face.box
            print(f"{path}: accepted (face {w:.0f}x{h:.0f} at {x:.0f},{y:.0f}, score {result.face.score:.2f})")
        except UserFacingError as exc:
            rejected += 1
            print(f"{path}: rejected [{exc.code}] {t(exc.code, settings.language, **exc.details)}")
    return 1 if rejected else 0


def cmd_models(args: argparse.Namespace) -> int:
    from bot import models_cli

    settings = _settings(args)
    return models_cli.run(args, settings)


def cmd_styles(args: argparse.Namespace) -> int:
    from bot import styles_cli

    return styles_cli.run(args, _settings(args))


def cmd_portrait(args: argparse.Namespace) -> int:
    from bot import offline

    return offline.portrait(args, _settings(args))


def cmd_train(args: argparse.Namespace) -> int:
    from bot import offline

    return offline.train(args, _settings(args))


def cmd_cartoon(args: argparse.Namespace) -> int:
    from bot import offline

    return offline.cartoon(args, _settings(args))


def cmd_talk(args: argparse.Namespace) -> int:
    from bot import offline

    return offline.talk(args, _settings(args))


def cmd_tryon(args: argparse.Namespace) -> int:
    from bot import offline

    return offline.tryon(args, _settings(args))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="facechain-bot", description=__doc__)
    parser.add_argument("--config", type=Path, default=None, help=CONFIG_HELP)
    # Every subcommand takes --config too (`facechain-bot run --config c.toml`, as `make run` passes it).
    # SUPPRESS: a subcommand without it keeps what was given before the subcommand.
    config = argparse.ArgumentParser(add_help=False)
    config.add_argument("--config", type=Path, default=argparse.SUPPRESS, help=CONFIG_HELP)
    sub = parser.add_subparsers(dest="command", required=True)

    def command(subparsers: Any, name: str, description: str) -> argparse.ArgumentParser:
        return subparsers.add_parser(name, parents=[config], help=description)

    command(sub, "run", "run the bot").set_defaults(func=cmd_run)
    p = command(sub, "health", "exit 0 while the running service is healthy, else 1 with the reason")
    p.add_argument("--max-age", type=float, default=HEARTBEAT_MAX_AGE_S, metavar="S",
                   help="oldest acceptable heartbeat, seconds")
    p.add_argument("--max-silence", type=float, default=WORKER_MAX_SILENCE_S, metavar="S",
                   help="longest a worker may go without answering, seconds")
    p.set_defaults(func=cmd_health)

    p = command(sub, "backup", "back up the database and user folders (safe while the bot runs)")
    p.add_argument("out", type=Path, help="the archive to write: .tar, or .tar.gz to compress")
    p.set_defaults(func=cmd_backup)

    p = command(sub, "restore", "restore a backup into the configured, empty data dir")
    p.add_argument("archive", type=Path, help="an archive written by `backup`")
    p.set_defaults(func=cmd_restore)

    p = command(sub, "check-selfie", "check photos as the bot would")
    p.add_argument("photos", nargs="+")
    p.set_defaults(func=cmd_check_selfie)

    models = command(sub, "models", "model status, download, tiny test models")
    msub = models.add_subparsers(dest="models_command", required=True)
    command(msub, "status", "what is installed under models_dir")
    pull = command(msub, "pull", "download models for features (or all)")
    pull.add_argument("features", nargs="*", default=["all"])
    pull.add_argument("--dry-run", action="store_true", help="list what would be fetched (from the manifest)")
    pull.add_argument("--check-sources", action="store_true",
                      help="with --dry-run: ask each source for its size (network, short timeout)")
    pull.add_argument("--accept-license", action="append", default=[], metavar="NAME",
                      help="accept a non-commercial licence by name (repeatable)")
    tiny = command(msub, "tiny", "build tiny random-weight models of the real formats")
    tiny.add_argument("out", type=Path)
    tiny.add_argument("--full-size", action="store_true", help="real SD1.5 dimensions, random weights (timing)")
    models.set_defaults(func=cmd_models)

    styles = command(sub, "styles", "check the styles catalogue, render its previews")
    ssub = styles.add_subparsers(dest="styles_command", required=True)
    p = command(ssub, "check", "check every style: file, prompt length in CLIP tokens, base and LoRA entries")
    p.add_argument("--styles-dir", type=Path, default=None, help="the folder to check (default: styles_dir)")
    p = command(ssub, "previews", "render one preview per style with a reference face, cached by style hash")
    p.add_argument("--face", type=Path, action="append", default=None,
                   help="the reference identity's photo (repeatable; default: the public-domain face shipped)")
    p.add_argument("--style", action="append", default=None, help="only these style ids (repeatable)")
    p.add_argument("--force", action="store_true", help="render again even when a preview is cached")
    p.add_argument("--seed", type=int, default=1234)
    styles.set_defaults(func=cmd_styles)

    p = command(sub, "portrait", "generate portraits from photos without a chat")
    p.add_argument("--photo", action="append", required=True, type=Path)
    p.add_argument("--style", required=True)
    p.add_argument("--count", type=int, default=2)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--lora", type=Path, default=None, help="a user LoRA folder from `train`")
    p.add_argument("--out", required=True, type=Path)
    p.set_defaults(func=cmd_portrait)

    p = command(sub, "train", "train a user LoRA from photos without a chat")
    p.add_argument("--photo", action="append", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--steps", type=int, default=None, help="total steps (default: per photo, capped)")
    p.set_defaults(func=cmd_train)

    p = command(sub, "cartoon", "cartoonise a photo without a chat")
    p.add_argument("--image", required=True, type=Path)
    p.add_argument("--style", required=True, help="a style id of facechain_core/cartoon_styles.toml, e.g. anime")
    p.add_argument("--out", required=True, type=Path, help="the picture to write (.jpg, or .png)")
    p.set_defaults(func=cmd_cartoon)

    p = command(sub, "talk", "make a portrait speak text or an audio file, without a chat")
    p.add_argument("--image", required=True, type=Path)
    said = p.add_mutually_exclusive_group(required=True)
    said.add_argument("--text", help="the words to speak (offline TTS)")
    said.add_argument("--audio", type=Path, help="an audio file to lip-sync (OGG/Opus, MP3, M4A, WAV)")
    p.add_argument("--language", default="en", help="the TTS language (en, zh)")
    p.add_argument("--round", action="store_true", help="a square video for round video notes")
    p.add_argument("--out", required=True, type=Path, help="the MP4 to write")
    p.set_defaults(func=cmd_talk)

    p = command(sub, "tryon", "dress the person of --photo in an outfit photo, without a chat")
    p.add_argument("--photo", action="append", required=True, type=Path, help="a selfie (repeatable)")
    p.add_argument("--outfit", required=True, type=Path, help="a photo of the outfit worn by someone")
    p.add_argument("--count", type=int, default=1)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--out", required=True, type=Path)
    p.set_defaults(func=cmd_tryon)
    return parser


def known_secrets(args: argparse.Namespace) -> list[str]:
    """The tokens this command may meet: from the environment and, when it loads, the config file."""
    found = [os.environ.get(TELEGRAM_TOKEN_ENV, ""), os.environ.get(DISCORD_TOKEN_ENV, "")]
    with contextlib.suppress(Exception):  # a broken config is reported by the command itself
        found += load_config(args.config).secrets()
    return [s for s in dict.fromkeys(found) if s]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Every way out (an error line, a traceback, a library's warning) passes the redactor.
    with redacted_output(known_secrets(args)):
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    except UserFacingError as exc:
        from handlers.messages import t

        print(f"error [{exc.code}]: {t(exc.code, None, **exc.details)}", file=sys.stderr)
        return 1
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        traceback.print_exc(file=sys.stderr)
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
