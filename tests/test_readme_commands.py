"""Every shell command README.md shows works as written, or is listed in SKIP with the reason it cannot run here.

Commands are read from README's ```sh blocks (comments dropped, ``\\`` continuations joined) and from
inline code in its prose that starts with a program (``facechain-bot``, ``make``, ...). Each is checked by
the first rule of ``RULES`` whose pattern matches it:

- ``make ...``: ``make -n`` (never ``make test`` from inside the suite), in a folder holding a
  ``config.toml``, and every ``facechain-bot`` line it would run must parse;
- ``facechain-bot run ...``: run against the fake Bot API until it serves, then stopped with SIGTERM;
- ``facechain-bot models pull ...``: run with ``--dry-run`` (added when missing) in a scratch dir;
- status, health, backup, restore, check-selfie: run for real in scratch dirs;
- any other ``facechain-bot ...``: the line as written must parse, and ``<subcommand> --help`` must
  list every option the README line uses (the pipelines need models; tests/test_cli.py runs them).

Adding a README command: a ``facechain-bot`` or ``make`` line is covered by the rules above as it is;
give it a rule (pattern -> check) when it can run for real here, or a SKIP entry (the command as
``shlex.join`` prints it -> why it cannot run in a test). A README command that neither a rule nor SKIP
covers fails ``test_every_readme_command_is_checked_or_skipped``; a SKIP entry the README no longer
has fails ``test_skip_table_lists_only_readme_commands``.
"""
from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from bot.cli import build_parser
from bot.storage import Storage
from tests.conftest import SHARED
from tests.fixtures.cli_batch import run_batch

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PROGRAMS = ("facechain-bot", "make", "docker", "bash", "python", "python3")
# Shell substitutions README uses, replaced before the line is split into words.
SUBSTITUTIONS = {"$(date +%F)": dt.date.today().isoformat()}
# Placeholders that must be real values for a command to run (others stay as written).
PLACEHOLDERS = {"FEATURE": "selfie"}

SKIP: dict[str, str] = {
    "make": "names the tool (\"Python 3.11 and `make`\"), not a command",
    "docker build -t facechain-bot .": "needs Docker and pulls a CUDA base image; CI has neither",
    "docker run --gpus all -e FACECHAIN_TELEGRAM_TOKEN=... -v fc-data:/data -v fc-models:/models facechain-bot":
        "needs Docker, a CUDA GPU and a real Telegram token",
    "bash bench/gpu_check.sh": "needs a CUDA GPU; the `make -n bench-gpu` rule checks its entry point",
    "facechain-bot models pull ...": "the shape of the command a log line names, not a command",
    "python bench/bench_likeness.py --faces selfies/ --models models/ --styles hanfu,business_headshot --count 4":
        "needs real weights and a folder of selfies; tests/test_bench_likeness.py runs its main on tiny models",
}


@dataclass
class ReadmeCommand:
    """One command as README writes it: environment assignments, then the words."""

    text: str  # shlex.join of env + words: the key of SKIP
    env: dict[str, str]
    words: list[str]

    @property
    def line(self) -> str:
        """The words alone (what the rules match)."""
        return shlex.join(self.words)


def _words(line: str) -> list[str]:
    for pattern, value in SUBSTITUTIONS.items():
        line = line.replace(pattern, value)
    return shlex.split(line, comments=True)


def _command(words: list[str]) -> ReadmeCommand | None:
    env: dict[str, str] = {}
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):
        name, _, value = words.pop(0).partition("=")
        env[name] = value
    if not words:
        return None
    text = shlex.join([f"{k}={v}" for k, v in env.items()] + words)
    return ReadmeCommand(text, env, words)


def readme_commands() -> list[ReadmeCommand]:
    """The commands of README's ```sh blocks, then those of its prose (inline code starting with a program)."""
    text = README.read_text(encoding="utf-8")
    found: list[ReadmeCommand] = []
    for block in re.findall(r"^```sh\n(.*?)^```", text, flags=re.S | re.M):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            command = _command(_words(line))
            if command is not None:
                found.append(command)
    prose = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    for span in re.findall(r"`([^`\n]+)`", prose):
        words = _words(span)
        command = _command(list(words))
        if command is not None and command.words[0] in PROGRAMS:
            found.append(command)
    unique: dict[str, ReadmeCommand] = {}
    for command in found:
        unique.setdefault(command.text, command)
    return list(unique.values())


def _cli_words(words: list[str]) -> list[str]:
    """The words after ``facechain-bot`` with README's notation removed: ``[--photo B.jpg]`` is optional."""
    return [PLACEHOLDERS.get(w, w) for w in (w.strip("[]") for w in words[1:]) if w]


def _parses(argv: list[str]) -> None:
    try:
        build_parser().parse_args(argv)
    except SystemExit as exc:
        pytest.fail(f"facechain-bot {shlex.join(argv)}: the command line does not parse (exit {exc.code})")


# -- the scratch world every batch command runs in ----------------------------------------------
@dataclass
class World:
    root: Path
    service: Path  # a folder with data/ (a database, a fresh heartbeat) where commands run
    selfie_config: Path | None  # a config naming the YuNet detector, when ../shared has it
    photo: Path | None
    jobs: list[dict[str, Any]] = field(default_factory=list)
    checks: dict[str, Callable[[dict[str, Any]], None]] = field(default_factory=dict)
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    last_archive: Path | None = None


Planner = Callable[[World, ReadmeCommand], None]


def _queue(world: World, command: ReadmeCommand, argv: list[str], check: Callable[[dict[str, Any]], None],
           cwd: Path | None = None, env: dict[str, str] | None = None) -> None:
    world.jobs.append({"key": command.text, "argv": argv, "cwd": str(cwd or world.service),
                       "env": {**command.env, "HF_ENDPOINT": "http://127.0.0.1:9", **(env or {})}})
    world.checks[command.text] = check


def plan_pull(world: World, command: ReadmeCommand) -> None:
    argv = _cli_words(command.words)
    _parses(argv)
    if "--dry-run" not in argv:
        argv.append("--dry-run")

    def check(result: dict[str, Any]) -> None:
        assert result["rc"] == 0, result["err"]
        assert "total to fetch" in result["out"] and "would fetch" in result["out"]

    _queue(world, command, argv, check)


def plan_status(world: World, command: ReadmeCommand) -> None:
    def check(result: dict[str, Any]) -> None:
        assert result["rc"] == 1, result["err"]  # nothing is installed in the scratch models_dir
        assert re.search(r"^missing\s+yunet\s", result["out"], flags=re.M), result["out"]

    _queue(world, command, _cli_words(command.words), check)


def plan_health(world: World, command: ReadmeCommand) -> None:
    beat = {"time": time.time(), "accepting": True, "queued": 0, "running": 0,
            "worker_states": [{"index": 0, "device": "cpu", "alive": True, "heard": time.time()}]}
    (world.service / "data" / "heartbeat.json").write_text(json.dumps(beat))

    def check(result: dict[str, Any]) -> None:
        assert result["rc"] == 0 and result["out"].startswith("healthy:"), result["out"] + result["err"]

    _queue(world, command, _cli_words(command.words), check)


def plan_backup_or_restore(world: World, command: ReadmeCommand) -> None:
    """`backup X` writes an archive of the scratch service; `restore Y` unpacks the last one into a new dir."""
    argv = _cli_words(command.words)
    _parses(argv)
    action, path = argv[0], Path(argv[1])
    if action == "backup":
        world.last_archive = world.root / "archives" / f"{len(world.jobs)}-{path.name}"
        world.last_archive.parent.mkdir(exist_ok=True)
        cwd, argv = world.service, ["backup", str(world.last_archive)]
        expected = "backed up"
    else:
        assert world.last_archive is not None, "README restores before it backs up"
        cwd = world.root / f"restore-{len(world.jobs)}"
        cwd.mkdir()
        argv, expected = ["restore", str(world.last_archive)], "restored"

    def check(result: dict[str, Any]) -> None:
        assert result["rc"] == 0 and result["out"].startswith(expected), result["out"] + result["err"]

    _queue(world, command, argv, check, cwd=cwd)


def plan_check_selfie(world: World, command: ReadmeCommand) -> None:
    if world.selfie_config is None or world.photo is None:
        plan_help(world, command)  # a fresh clone without ../shared has no detector nor photos
        return
    argv = ["--config", str(world.selfie_config), "check-selfie", str(world.photo)]
    _parses(_cli_words(command.words))

    def check(result: dict[str, Any]) -> None:
        assert result["rc"] == 0 and ": accepted (face" in result["out"], result["out"] + result["err"]

    _queue(world, command, argv, check)


def plan_styles_check(world: World, command: ReadmeCommand) -> None:
    """`styles check` runs for real over the shipped catalogue and passes."""
    def check(result: dict[str, Any]) -> None:
        assert result["rc"] == 0 and result["out"].startswith("ok: "), result["out"] + result["err"]

    _queue(world, command, _cli_words(command.words), check)


def plan_help(world: World, command: ReadmeCommand) -> None:
    """The line parses as written, and its subcommand's --help lists each option the line uses."""
    argv = _cli_words(command.words)
    _parses(argv)
    subcommand = [w for w in argv if not w.startswith("-")][:2 if argv[0] in ("models", "styles") else 1]
    options = sorted({w.split("=")[0] for w in argv if w.startswith("--")})

    def check(result: dict[str, Any]) -> None:
        assert result["rc"] == 0, result["err"]
        assert all(option in result["out"] for option in options), (options, result["out"])

    _queue(world, command, [*subcommand, "--help"], check)


# -- checks that run outside the batch ----------------------------------------------------------
def check_make(command: ReadmeCommand, tmp_path: Path) -> None:
    """`make -n` (prints, runs nothing) in a copy of the checkout's top holding a config.toml (the natural
    first step); every facechain-bot line it would run parses."""
    shutil.copy(ROOT / "Makefile", tmp_path / "Makefile")
    (tmp_path / "pyproject.toml").symlink_to(ROOT / "pyproject.toml")
    (tmp_path / "config.toml").write_text("")
    done = subprocess.run(["make", "-n", *command.words[1:]], cwd=tmp_path,
                          env={**os.environ, **command.env}, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    for line in done.stdout.splitlines():
        if "facechain-bot" not in line:
            continue
        words = shlex.split(line, comments=True)
        for index, word in enumerate(words):
            if word.endswith("/facechain-bot") or word == "facechain-bot":
                _parses(words[index + 1:])


async def check_run(command: ReadmeCommand, tmp_path: Path, fake_telegram: Any) -> None:
    """The service starts from the line as written (its config.toml pointing at the fake Bot API), answers
    /start, and stops cleanly on SIGTERM."""
    argv = _cli_words(command.words)
    _parses(argv)
    (tmp_path / "config.toml").write_text(
        f'data_dir = "{tmp_path / "data"}"\n[telegram]\nbase_url = "{fake_telegram.base_url}"\n'
        f'base_file_url = "{fake_telegram.base_file_url}"\npoll_timeout = 0.5\n')
    env = {**os.environ, **command.env, "FACECHAIN_TELEGRAM_TOKEN": fake_telegram.token,
           "PYTHONPATH": str(ROOT)}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bot", *argv, cwd=tmp_path, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        await fake_telegram.wait_for("setMyCommands", timeout=60)
        mark = fake_telegram.mark()
        fake_telegram.send_message(77, None, "/start")
        await fake_telegram.wait_for("sendMessage", since=mark, timeout=20)
        process.send_signal(signal.SIGTERM)
        output, _ = await asyncio.wait_for(process.communicate(), timeout=60)
    finally:
        if process.returncode is None:
            process.kill()
    assert process.returncode == 0, output.decode()[-2000:]


# Pattern (on the command's words, as shlex.join prints them) -> what checks it; the first match wins.
BATCH_RULES: list[tuple[str, Planner]] = [
    (r"^facechain-bot models pull\b", plan_pull),
    (r"^facechain-bot models status\b", plan_status),
    (r"^facechain-bot health\b", plan_health),
    (r"^facechain-bot (backup|restore)\b", plan_backup_or_restore),
    (r"^facechain-bot check-selfie\b", plan_check_selfie),
    (r"^facechain-bot styles check\b", plan_styles_check),
    (r"^facechain-bot (?!run\b)", plan_help),
]
RUN_RULE = r"^facechain-bot run\b"
MAKE_RULE = r"^make\s"
COMMANDS = [c for c in readme_commands() if c.text not in SKIP]


def _planner(command: ReadmeCommand) -> Planner | None:
    return next((plan for pattern, plan in BATCH_RULES if re.search(pattern, command.line)), None)


def _ids(commands: list[ReadmeCommand]) -> list[str]:
    return [c.text[:70] for c in commands]


MAKE_COMMANDS = [c for c in COMMANDS if re.search(MAKE_RULE, c.line)]
RUN_COMMANDS = [c for c in COMMANDS if re.search(RUN_RULE, c.line)]
BATCH_COMMANDS = [c for c in COMMANDS if _planner(c) is not None]
# `ray ...` (the Ray cluster recipe): parsed by Ray's own CLI, options and their values checked, not run.
RAY_COMMANDS = [c for c in COMMANDS if c.words[0] == "ray"]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    """Runs every batch command of README once, in one child interpreter, in README's order."""
    root = tmp_path_factory.mktemp("readme")
    service = root / "service"
    (service / "data").mkdir(parents=True)

    async def make_database() -> None:
        async with Storage(service / "data" / "facechain.sqlite3"):
            pass

    asyncio.run(make_database())
    yunet, faces = SHARED / "models" / "yunet_s_640_640.onnx", SHARED / "faces" / "obama.jpg"
    selfie_config = None
    if yunet.is_file() and faces.is_file():
        selfie_config = root / "selfie.toml"
        selfie_config.write_text(f'[selfie]\ndetector_model = "{yunet}"\n')
    world = World(root, service, selfie_config, faces if faces.is_file() else None)
    for command in BATCH_COMMANDS:
        plan = _planner(command)
        assert plan is not None
        plan(world, command)
    for job, result in zip(world.jobs, run_batch(world.jobs), strict=True):
        world.results[job["key"]] = result
    return world


@pytest.mark.parametrize("command", BATCH_COMMANDS, ids=_ids(BATCH_COMMANDS))
def test_readme_command_runs(command: ReadmeCommand, world: World) -> None:
    world.checks[command.text](world.results[command.text])


@pytest.mark.parametrize("command", MAKE_COMMANDS, ids=_ids(MAKE_COMMANDS))
def test_readme_make_command(command: ReadmeCommand, tmp_path: Path) -> None:
    check_make(command, tmp_path)


@pytest.mark.parametrize("command", RUN_COMMANDS, ids=_ids(RUN_COMMANDS))
async def test_readme_run_command(command: ReadmeCommand, tmp_path: Path, fake_telegram: Any) -> None:
    await check_run(command, tmp_path, fake_telegram)


@pytest.mark.parametrize("command", RAY_COMMANDS, ids=_ids(RAY_COMMANDS))
def test_readme_ray_command_parses(command: ReadmeCommand) -> None:
    import click

    from tests.fixtures.ray_cluster import ray_or_skip

    ray_or_skip()
    from ray.scripts.scripts import cli

    assert set(command.env) <= {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"} and command.env.get("RAY_AUTH_MODE", "token") == "token"
    subcommand = cli.commands.get(command.words[1])
    assert subcommand is not None, f"ray has no subcommand {command.words[1]!r}"
    try:
        subcommand.make_context(command.words[1], command.words[2:])
    except click.ClickException as exc:
        pytest.fail(f"{command.text}: {exc.format_message()}")


def test_every_readme_command_is_checked_or_skipped() -> None:
    checked = {c.text for c in MAKE_COMMANDS + RUN_COMMANDS + BATCH_COMMANDS + RAY_COMMANDS}
    unchecked = [c.text for c in COMMANDS if c.text not in checked]
    assert not unchecked, f"README commands that no rule of {__name__} runs and SKIP does not list: {unchecked}"


def test_skip_table_lists_only_readme_commands() -> None:
    shown = {c.text for c in readme_commands()}
    assert set(SKIP) <= shown, f"SKIP entries README no longer shows: {set(SKIP) - shown}"


def test_the_readme_is_read() -> None:
    texts = {c.text for c in COMMANDS}
    assert {"make test", "facechain-bot run --config config.toml", "make run CONFIG=config.toml",
            "FACECHAIN_TELEGRAM_TOKEN=123456:ABC... make run", "facechain-bot models pull all --dry-run"} <= texts
