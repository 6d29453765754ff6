"""Fault campaigns, longer than the test suite's: the whole service against the fake Bot API, many users'
jobs under injected faults (chat-API 5xx, 429, timeouts and an outage; SQLite locked and disk full;
workers SIGKILLed mid-job; the service SIGKILLed twice and stopped during a delivery), counted per job
from the outside: submitted, generated, delivered, failed with the user told, lost, twice.

Run: ``.venv/bin/python bench/bench_faults.py [--seeds N] [--users U] [--jobs J]`` (default: 3 seeds of
20 users x 10 jobs). The campaign itself is ``tests/fixtures/campaign.py``; tests/test_faults.py runs one.
"""
from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.fixtures.campaign import Campaign, Report  # noqa: E402


async def main(seeds: list[int], users: int, jobs: int) -> int:
    reports: list[Report] = []
    for seed in seeds:
        root = Path(tempfile.mkdtemp(prefix="bench-faults-"))
        report = await Campaign(root, seed, users=users, jobs_per_user=jobs, outage_s=5.0).run()
        reports.append(report)
        for line in report.lines()[:3]:
            print(line)
        if report.lost or report.generated_twice or report.delivered_twice:
            print(f"  lost {report.lost}, generated twice {report.generated_twice}, delivered twice "
                  f"{report.delivered_twice}; kept {root} (service.log, ledger, data)")
        else:
            shutil.rmtree(root, ignore_errors=True)
        print(f"  ({report.seconds:.0f} s)")
    total = sum(r.submitted for r in reports)
    lost = sum(len(r.lost) for r in reports)
    twice = sum(len(r.generated_twice) for r in reports)
    sent_twice = sum(len(r.delivered_twice) for r in reports)
    print(f"total over {len(reports)} campaign(s): {total} jobs, "
          f"{sum(r.delivered for r in reports)} delivered, {sum(r.failed_told for r in reports)} failed with "
          f"the user told; lost {lost}, generated twice {twice}, delivered twice {sent_twice}")
    return 1 if lost or twice or sent_twice else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3, help="campaigns to run, each with its own seed")
    parser.add_argument("--seed", type=int, action="append", default=[], help="a seed to replay (repeatable)")
    parser.add_argument("--users", type=int, default=20)
    parser.add_argument("--jobs", type=int, default=10, help="jobs per user")
    args = parser.parse_args()
    chosen = args.seed or [random.SystemRandom().randrange(1_000_000) for _ in range(args.seeds)]
    started = time.monotonic()
    code = asyncio.run(main(chosen, args.users, args.jobs))
    print(f"took {time.monotonic() - started:.0f} s (2-core CPU figures vary with load)")
    sys.exit(code)
