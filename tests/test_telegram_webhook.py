"""Telegram on webhooks: the real python-telegram-bot webhook server against the fake Bot API."""
from __future__ import annotations

import pytest

from bot.config import ConfigError, load_config
from bot.platforms.telegram_adapter import TelegramAdapter
from handlers.protocols import Event, ReplyChannel
from tests.fixtures.fake_telegram import FakeTelegram, fake_telegram  # noqa: F401
from tests.fixtures.recorder import Recorder

pytestmark = pytest.mark.timeout(60)
SECRET = "s3cret_token-for-tests"


async def test_webhook_is_set_with_its_secret_and_only_signed_updates_are_handled(
        fake_telegram: FakeTelegram, unused_tcp_port: int) -> None:  # noqa: F811
    async def pong(event: Event, channel: ReplyChannel) -> None:
        await channel.send_text(f"pong {event.command}")

    recorder = Recorder(pong)
    url = f"http://127.0.0.1:{unused_tcp_port}/telegram/hook"
    settings = fake_telegram.bot_settings(telegram={
        "webhook_url": url, "webhook_listen": "127.0.0.1", "webhook_port": unused_tcp_port,
        "webhook_secret_token": SECRET})
    async with TelegramAdapter(settings, dispatch=recorder):
        assert fake_telegram.webhook["url"] == url and fake_telegram.webhook["secret_token"] == SECRET
        assert not fake_telegram.calls_of("getUpdates")  # no polling
        fake_telegram.send_message(42, None, "/start")
        update = fake_telegram.take_update()
        assert await fake_telegram.post_webhook(update, secret_token="wrong") == 403
        assert await fake_telegram.post_webhook(update, secret_token="") == 403  # no secret at all
        assert await fake_telegram.post_webhook(update) == 200
        (event,) = await recorder.wait()
        reply = await fake_telegram.wait_for("sendMessage")
    assert event.command == "start" and event.user.key == "telegram:42"
    assert reply.params["text"] == "pong start"
    assert len(fake_telegram.calls_of("sendMessage")) == 1  # the refused posts were never handled


def test_webhook_settings_need_a_secret_and_take_it_from_the_environment(tmp_path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('[telegram]\nwebhook_url = "https://bot.example.org/tg"\n')
    with pytest.raises(ConfigError, match="webhook_secret_token"):
        load_config(config, environ={})
    settings = load_config(config, environ={"FACECHAIN_TELEGRAM_WEBHOOK_SECRET": SECRET})
    assert settings.telegram.webhook_secret_token.get_secret_value() == SECRET
    assert SECRET in settings.secrets() and SECRET not in repr(settings)
    config.write_text('[telegram]\nwebhook_secret_token = "no spaces allowed"\n')
    with pytest.raises(ConfigError, match="webhook_secret_token"):
        load_config(config, environ={})
