"""The configuration: the example documents every key, errors name the key, tokens stay secret."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import BaseModel

from bot.config import ConfigError, Settings, load_config

EXAMPLE = Path(__file__).resolve().parent.parent / "config.example.toml"


def _keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys += _keys(annotation, f"{prefix}{name}.")
        else:
            keys.append(f"{prefix}{name}")
    return keys


def test_the_example_loads_and_documents_every_key():
    settings = load_config(EXAMPLE)
    assert settings.scheduler.gpus == [] and settings.language == "en"
    text = EXAMPLE.read_text()
    sections = {"": text.split("\n[", 1)[0]}
    for match in re.finditer(r"^\[([a-z_.]+)\]\n(.*?)(?=^\[|\Z)", text, re.S | re.M):
        sections[match.group(1)] = match.group(2)
    missing = []
    for key in _keys(Settings):
        section, _, name = key.rpartition(".")
        body = sections.get(section, "")
        documented = re.search(rf"^#? ?{name} =", body, re.M) or re.search(rf"^#? ?\[{re.escape(key)}[.\]]", text, re.M)
        if not documented:
            missing.append(key)
    assert missing == []


def test_errors_name_each_bad_key(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('language = "fr"\n[scheduler]\nqueue_max = 0\ncolour = "red"\n')
    with pytest.raises(ConfigError) as bad:
        load_config(path)
    text = str(bad.value)
    assert "language" in text and "scheduler.queue_max" in text and "scheduler.colour" in text
    path.write_text("data_dir = [")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(path)


def test_tokens_come_from_the_environment_and_never_show():
    token = "123456:ABCdefGHIjklMNOpqrSTUvwxYZ"
    settings = load_config(environ={"FACECHAIN_TELEGRAM_TOKEN": token, "FACECHAIN_DISCORD_TOKEN": "d" * 30})
    assert settings.telegram.enabled and settings.discord.enabled
    assert token not in repr(settings) and token not in str(settings.model_dump())
    assert settings.secrets() == [token, "d" * 30]


def test_run_works_without_a_file():
    settings = load_config(None, environ={})
    assert settings.db_path == Path("data") / "facechain.sqlite3" and not settings.telegram.enabled
