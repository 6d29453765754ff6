"""The `facechain-bot` command line. Library code raises; only this module exits."""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
import time
from pathlib import Path

from bot.config import ConfigError, Settings, load_config
from facechain_core.errors import UserFacingError

log = logging.getLogger("facechain_bot")

HEARTBEAT_MAX_AGE_S = 60.0


def _settings(args: argparse.Namespace) -> Settings:
    settings = load_config(args.config)
    from bot.logsetup import configure_logging

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


def cmd_health(args: argparse.Namespace) -> int:
    """Exits 0 while the running service's heartbeat is fresh."""
    settings = load_config(args.config)
    try:
        beat = json.loads(settings.heartbeat_path.read_text())
    except (OSError, ValueError):
        print("unhealthy: no heartbeat")
        return 1
    age = time.time() - float(beat.get("time", 0))
    healthy = age < HEARTBEAT_MAX_AGE_S and beat.get("workers_alive", 1) > 0
    print(("healthy" if healthy else "unhealthy") + f": heartbeat {age:.0f} s old, {json.dumps(beat)}")
    return 0 if healthy else 1


def cmd_check_selfie(args: argparse.Namespace) -> int:
    """Prints the selfie verdict for each photo; exits 1 if any was rejected."""
    from handlers.messages import t
    from handlers.selfie import lazy_selfie_checker

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


def cmd_portrait(args: argparse.Namespace) -> int:
    from bot import offline

    return offline.portrait(args, _settings(args))


def cmd_train(args: argparse.Namespace) -> int:
    from bot import offline

    return offline.train(args, _settings(args))


def cmd_cartoon(args: argparse.Namespace) -> int:
    from bot import offline

    return offline.cartoon(args, _settings(args))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="facechain-bot", description=__doc__)
    parser.add_argument("--config", type=Path, default=None, help="TOML config (see config.example.toml)")
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("run", help="run the bot").set_defaults(func=cmd_run)
    sub.add_parser("health", help="exit 0 while the running service is healthy").set_defaults(func=cmd_health)

    p = sub.add_parser("check-selfie", help="check photos as the bot would")
    p.add_argument("photos", nargs="+")
    p.set_defaults(func=cmd_check_selfie)

    models = sub.add_parser("models", help="model status, download, tiny test models")
    msub = models.add_subparsers(dest="models_command", required=True)
    msub.add_parser("status", help="what is installed under models_dir")
    pull = msub.add_parser("pull", help="download models for features (or all)")
    pull.add_argument("features", nargs="*", default=["all"])
    pull.add_argument("--dry-run", action="store_true", help="list what would be fetched")
    pull.add_argument("--accept-license", action="append", default=[], metavar="NAME",
                      help="accept a non-commercial licence by name (repeatable)")
    tiny = msub.add_parser("tiny", help="build tiny random-weight models of the real formats")
    tiny.add_argument("out", type=Path)
    tiny.add_argument("--full-size", action="store_true", help="real SD1.5 dimensions, random weights (timing)")
    models.set_defaults(func=cmd_models)

    p = sub.add_parser("portrait", help="generate portraits from photos without a chat")
    p.add_argument("--photo", action="append", required=True, type=Path)
    p.add_argument("--style", required=True)
    p.add_argument("--count", type=int, default=2)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--lora", type=Path, default=None, help="a user LoRA folder from `train`")
    p.add_argument("--out", required=True, type=Path)
    p.set_defaults(func=cmd_portrait)

    p = sub.add_parser("train", help="train a user LoRA from photos without a chat")
    p.add_argument("--photo", action="append", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--steps", type=int, default=None, help="total steps (default: per photo, capped)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("cartoon", help="cartoonise a photo without a chat")
    p.add_argument("--image", required=True, type=Path)
    p.add_argument("--style", required=True, help="a style id of facechain_core/cartoon_styles.toml, e.g. anime")
    p.add_argument("--out", required=True, type=Path, help="the picture to write (.jpg, or .png)")
    p.set_defaults(func=cmd_cartoon)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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


if __name__ == "__main__":
    sys.exit(main())
