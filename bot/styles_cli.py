"""`facechain-bot styles check|previews`: the operator's side of the styles catalogue."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bot.config import Settings


def cmd_check(args: argparse.Namespace, settings: Settings) -> int:
    """Prints every problem of the catalogue (file, key, reason) and a summary; exit 1 on any problem."""
    from facechain_core.style_check import check_styles

    report = check_styles(Path(args.styles_dir or settings.styles_dir))
    for problem in report.problems:
        print(problem)
    if report.ok:
        print(f"ok: {report.summary()}")
        return 0
    print(f"{len(report.problems)} problem(s) in {args.styles_dir or settings.styles_dir}", file=sys.stderr)
    return 1


def run(args: argparse.Namespace, settings: Settings) -> int:
    if args.styles_command == "check":
        return cmd_check(args, settings)
    from bot import style_previews

    return style_previews.run(args, settings)
