"""Every way out of the command line passes the redactor: the bot token never reaches stdout or stderr."""
from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest
from aiohttp import web

from bot import cli
from tests.fixtures.local_server import serve_locally

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "7654321098:AAE-secret-half-of-the-cli-token-xyz"
SECRET_HALF = TOKEN.split(":", 1)[1]


async def _bot_api(status: int) -> tuple[web.AppRunner, str]:
    """A Bot API on 127.0.0.1 that refuses every call with `status` (a wrong token; a wrong base_url)."""

    async def refuse(request: web.Request) -> web.Response:
        description = "Unauthorized" if status == 401 else "Not Found"
        return web.json_response({"ok": False, "error_code": status, "description": description}, status=status)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", refuse)
    runner, port = await serve_locally(app)
    return runner, f"http://127.0.0.1:{port}/bot"


@pytest.mark.parametrize("status", [401, 404])
async def test_a_refused_token_is_reported_without_the_token(tmp_path: Path, status: int) -> None:
    """python-telegram-bot's InvalidToken quotes the token; `run` reports it masked, and exits 1."""
    runner, base_url = await _bot_api(status)
    config = tmp_path / "c.toml"
    config.write_text(f'data_dir = "{tmp_path / "data"}"\n'
                      f'[telegram]\nbase_url = "{base_url}"\n')
    try:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bot", "run", "--config", str(config), cwd=ROOT,
            env={**os.environ, "FACECHAIN_TELEGRAM_TOKEN": TOKEN},
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(process.communicate(), timeout=120)
    finally:
        await runner.cleanup()
    text = (out + err).decode()
    assert process.returncode == 1, text
    assert SECRET_HALF not in text and "AAE-secret" not in text
    assert "InvalidToken" in text and "***" in text  # the failure is still named


def test_any_command_failure_is_masked(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """An unexpected exception of any command (message and traceback) goes out masked."""
    monkeypatch.setenv("FACECHAIN_TELEGRAM_TOKEN", TOKEN)

    def explode(args: object) -> int:
        raise RuntimeError(f"GET https://api.telegram.org/bot{TOKEN}/getMe failed")

    monkeypatch.setattr(cli, "cmd_health", explode)
    assert cli.main(["health"]) == 1
    captured = capsys.readouterr()
    assert SECRET_HALF not in captured.out + captured.err
    assert "RuntimeError" in captured.err and "bot***/getMe failed" in captured.err
