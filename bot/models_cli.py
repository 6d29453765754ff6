"""`facechain-bot models status|pull|tiny`: the operator's side of the model manifest."""
from __future__ import annotations

import argparse
import sys
import time

from bot.config import Settings
from facechain_core.manifest import ManifestError, UnknownFeature, load_manifest, status
from facechain_core.pull import PullError, PullProgress, pull


# Open RAIL licences: free use, but with use restrictions that bind whoever serves the model's output.
USE_RESTRICTED = {"creativeml-openrail-m", "openrail", "openrail++", "openrail-m"}


def _mb(size: int | None) -> str:
    return "?" if size is None else f"{size / 1e6:,.1f} MB"


def cmd_status(settings: Settings) -> int:
    """Prints one line per model: state, path, size, licence; exit 1 if any is missing."""
    rows = status(settings.models_dir)
    for row in rows:
        nc = " (non-commercial)" if row.entry.non_commercial else ""
        print(f"{row.state.value:<14} {row.name:<28} {_mb(row.actual_size or row.expected_size):>12}  "
              f"{row.path}  [{row.entry.licence}{nc}] {row.detail}".rstrip())
    return 0 if all(r.usable for r in rows) else 1


class _ProgressPrinter:
    """Prints download progress at most twice a second."""

    def __init__(self) -> None:
        self.last = 0.0

    def __call__(self, p: PullProgress) -> None:
        now = time.monotonic()
        if now - self.last < 0.5 and p.done != p.total:
            return
        self.last = now
        total = f"/{_mb(p.total)}" if p.total else ""
        print(f"\r{p.model}: {p.file} {_mb(p.done)}{total}", end="", file=sys.stderr, flush=True)


def cmd_pull(args: argparse.Namespace, settings: Settings) -> int:
    if args.check_sources and not args.dry_run:
        print("error: --check-sources goes with --dry-run (a pull checks every source anyway)", file=sys.stderr)
        return 2
    report = pull(load_manifest(), settings.models_dir, args.features, accept_licenses=set(args.accept_license),
                  dry_run=args.dry_run, check_sources=args.check_sources,
                  progress=None if args.dry_run else _ProgressPrinter())
    print(file=sys.stderr)
    for model in report.models:
        nc = ", non-commercial" if model.non_commercial else ""
        print(f"{model.action.value:<18} {model.name:<28} {_mb(model.size):>12}  [{model.licence}{nc}]  "
              f"{model.source or ''}")
        for warning in model.warnings:
            print(f"  warning: {warning}")
    restricted = sorted({m.licence for m in report.models if m.licence in USE_RESTRICTED})
    if restricted:
        print(f"use restrictions: {', '.join(restricted)} forbid, among others, unlawful use, harming "
              "minors, defaming or harassing others and harmful false information; pass them on to your users (the licence texts are at "
              "each model's licence_url in facechain_core/models.toml)")
    if report.dry_run:
        print(f"total to fetch: {_mb(report.bytes_to_fetch)}")
        if report.licences_to_accept:
            print("licences to accept: " + ", ".join(report.licences_to_accept))
            print(f"command: {report.pull_command}")
    return 0


def cmd_tiny(args: argparse.Namespace) -> int:
    from facechain_core.tiny import build_all

    for name, path in build_all(args.out, full_size=args.full_size).items():
        print(f"{name:<28} {path}")
    return 0


def run(args: argparse.Namespace, settings: Settings) -> int:
    try:
        if args.models_command == "status":
            return cmd_status(settings)
        if args.models_command == "pull":
            return cmd_pull(args, settings)
        return cmd_tiny(args)
    except (PullError, UnknownFeature, ManifestError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
