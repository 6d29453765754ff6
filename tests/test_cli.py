"""The command line: selfie verdicts, model status, config errors, and the chat-free pipelines."""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from bot import offline
from bot.config import Settings
from tests.fixtures.portrait_service import TINY_PIPELINE, tiny_model_paths
from tests.fixtures.tiny_models import one_torch_thread, tiny_models_dir  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent


def _cli(*args: str, config: Path | None = None) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "bot", *(["--config", str(config)] if config else []), *args]
    return subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=120)


def test_check_selfie_prints_each_verdict_and_fails_on_a_rejection(tmp_path, faces_dir, yunet_path):
    config = tmp_path / "c.toml"
    config.write_text(f'[selfie]\ndetector_model = "{yunet_path}"\n')
    ok = _cli("check-selfie", str(faces_dir / "obama.jpg"), str(faces_dir / "biden.jpg"), config=config)
    assert ok.returncode == 0 and ok.stdout.count("accepted") == 2
    mixed = _cli("check-selfie", str(faces_dir / "obama.jpg"), str(faces_dir / "two_people.jpg"), config=config)
    assert mixed.returncode == 1 and "[selfie.several_faces]" in mixed.stdout


def test_models_status_lists_the_manifest_and_fails_while_something_is_missing(tmp_path, yunet_path):
    config = tmp_path / "c.toml"
    config.write_text(f'models_dir = "{yunet_path.parent}"\n')
    result = _cli("models", "status", config=config)
    assert result.returncode == 1
    lines = {line.split()[1]: line.split()[0] for line in result.stdout.splitlines()}
    assert lines["yunet"] == "installed" and lines["sd15"] == "missing"


def test_a_bad_config_key_is_named_and_run_needs_a_token(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text("[scheduler]\ngpus = 'two'\n")
    result = _cli("run", config=config)
    assert result.returncode == 2 and "scheduler.gpus" in result.stderr
    config.write_text("")
    result = _cli("run", config=config)
    assert result.returncode == 2 and "FACECHAIN_TELEGRAM_TOKEN" in result.stderr


def test_portrait_and_train_without_a_chat(tmp_path, faces_dir, tiny_models_dir, yunet_path, one_torch_thread):  # noqa: F811
    settings = Settings(models_dir=tiny_models_dir, model_paths=tiny_model_paths(tiny_models_dir, yunet_path),
                        selfie={"detector_model": str(yunet_path)}, pipeline=TINY_PIPELINE)
    photos = [faces_dir / "obama.jpg", faces_dir / "obama2.jpg"]
    lora_dir = tmp_path / "lora"
    assert offline.train(argparse.Namespace(photo=photos, out=lora_dir, steps=3), settings) == 0
    assert (lora_dir / "pytorch_lora_weights.safetensors").is_file()
    out = tmp_path / "portraits"
    args = argparse.Namespace(photo=photos, style="hanfu", count=2, seed=7, lora=lora_dir, out=out)
    assert offline.portrait(args, settings) == 0
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 2 and all(Image.open(p).size == (64, 64) for p in pngs)


def test_portrait_refuses_a_photo_without_one_face(tmp_path, faces_dir, yunet_path):
    settings = Settings(selfie={"detector_model": str(yunet_path)})
    args = argparse.Namespace(photo=[faces_dir / "two_people.jpg"], style="hanfu", count=1, seed=None, lora=None,
                              out=tmp_path)
    with pytest.raises(Exception) as refused:
        offline.portrait(args, settings)
    assert getattr(refused.value, "code", "") == "selfie.several_faces"


async def test_run_serves_from_the_environment_token_and_stops_cleanly_on_sigterm(fake_telegram, tmp_path):
    """`facechain-bot run` as an operator starts it: token from the environment, answers, exits 0 on SIGTERM."""
    import asyncio
    import os
    import signal

    config = tmp_path / "c.toml"
    config.write_text(f'data_dir = "{tmp_path / "data"}"\n[telegram]\nbase_url = "{fake_telegram.base_url}"\n'
                      f'base_file_url = "{fake_telegram.base_file_url}"\npoll_timeout = 0.5\n')
    env = {**os.environ, "FACECHAIN_TELEGRAM_TOKEN": fake_telegram.token}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bot", "--config", str(config), "run", cwd=ROOT, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        await fake_telegram.wait_for("setMyCommands", timeout=60)
        mark = fake_telegram.mark()
        fake_telegram.send_message(77, None, "/start")
        reply = await fake_telegram.wait_for("sendMessage", since=mark, timeout=20)
        assert "/delete" in reply.params["text"]
        process.send_signal(signal.SIGTERM)
        output, _ = await asyncio.wait_for(process.communicate(), timeout=60)
    finally:
        if process.returncode is None:
            process.kill()
    assert process.returncode == 0
    assert fake_telegram.token.split(":", 1)[1].encode() not in output  # the token's secret half is never logged
    assert (tmp_path / "data" / "heartbeat.json").is_file()
