"""Languages: the app's language by default, /language overrides it everywhere (replies, styles,
job messages), command menus per language; driven through the real service and the fake Bot API."""
from __future__ import annotations

import discord
import pytest
from discord import app_commands

from bot.app import open_service
from bot.platforms.discord_commands import CatalogueTranslator, described
from bot.engine.jobkinds import JobKind
from handlers import router
from handlers.language import parse_language
from handlers.messages import t
from handlers.portrait import STYLES_PER_PAGE
from handlers.progress import submit_with_progress
from tests.fixtures.fake_telegram import FakeUser

ANN = 4242
BOB = 4343
SLEEP_KIND = JobKind("test.sleep", "facechain_core.devtools:SleepPipeline", 1, 2, 60)


@pytest.fixture
def render_command():
    """A test-only /render that runs the devtools sleep job through the scheduler."""
    async def render(services, event, channel):
        await submit_with_progress(services, event, channel, "test.sleep",
                                   {"steps": 2, "delay_s": 0.05, "suffix": ".png"})
    router.register_command("render", render, "help.help", in_menu=False)
    yield
    router._commands.pop("render", None)


@pytest.fixture
def settings(fake_telegram, tmp_path):
    return fake_telegram.bot_settings(data_dir=tmp_path / "data", models_dir=tmp_path / "models",
                                      scheduler={"progress_interval_s": 0, "shutdown_grace_s": 0})


async def _say(fake, user: FakeUser, text: str):
    mark = fake.mark()
    fake.send_message(user, None, text)
    return await fake.wait_for("sendMessage", since=mark, timeout=10)


def _labels(call) -> list[str]:
    return [b["text"] for row in call.params["reply_markup"]["inline_keyboard"] for b in row]


@pytest.mark.parametrize(("text", "code"), [
    ("zh", "zh"), ("zh-Hans", "zh"), ("ZH_cn", "zh"), ("中文", "zh"), ("Chinese", "zh"),
    ("en", "en"), ("en-US", "en"), ("English", "en"), ("英文", "en"), ("fr", None), ("klingon", None), ("", None),
])
def test_parse_language(text: str, code: str | None) -> None:
    assert parse_language(text) == code


async def test_language_choice_wins_over_the_app_everywhere(fake_telegram, settings, render_command) -> None:
    fake = fake_telegram
    ann = FakeUser(ANN, language_code="en")  # her app stays English throughout
    async with open_service(settings, extra_kinds=[SLEEP_KIND]) as service:
        assert (await _say(fake, ann, "/help")).params["text"].startswith(t("core.help_header", "en"))

        reply = await _say(fake, ann, "/language 中文")
        assert reply.params["text"] == t("language.set", "zh")
        assert await service.storage.language_choice(f"telegram:{ANN}") == ("zh", True)

        # Replies, command lines, style names and errors now come in Chinese.
        help_text = (await _say(fake, ann, "/help")).params["text"]
        assert help_text.startswith(t("core.help_header", "zh")) and t("help.language", "zh") in help_text
        styles = await _say(fake, ann, "/styles")
        catalog = service.services.styles.only(["sd15"])
        page = catalog.page(0, STYLES_PER_PAGE)
        shown = [label for label in _labels(styles) if label not in ("◀", "▶", t("panel.button", "zh"))]
        assert t("panel.button", "zh") in _labels(styles)  # the options panel's button speaks Chinese too
        assert shown == [s.display_name("zh") for s in page.styles] and "汉服" in shown
        assert styles.params["text"].startswith(
            t("portrait.catalogue", "zh", page=1, pages=page.total_pages, count=len(catalog)))
        unknown = await _say(fake, ann, "/nosuchcommand")
        assert unknown.params["text"] == t("core.unknown_command", "zh", command="nosuchcommand")

        # Job messages: the queued message, the result's caption and the final edit.
        mark = fake.mark()
        fake.send_message(ann, None, "/render")
        queued = await fake.wait_for("sendMessage", since=mark, timeout=10)
        assert _labels(queued) == [t("cancel.button", "zh")]
        photo = await fake.wait_for("sendPhoto", since=mark, timeout=30)
        assert photo.params.get("caption", "").startswith(t("result.caption", "zh"))
        done = await fake.wait_for("editMessageText", lambda c: c.params["text"] == t("progress.done", "zh"),
                                   since=mark, timeout=10)
        assert done.params["message_id"] == queued.result["message_id"]

        # /language alone offers buttons in each language's own name; pressing one switches back.
        question = await _say(fake, ann, "/language")
        assert question.params["text"] == t("language.current", "zh")
        assert _labels(question) == [t("language.name_en", "zh"), t("language.name_zh", "zh")]
        mark = fake.mark()
        fake.press_button(question.result, "lang:en")
        answer = await fake.wait_for("answerCallbackQuery", since=mark, timeout=10)
        assert answer.params.get("text") == t("language.set", "en")
        edit = await fake.wait_for("editMessageText", since=mark, timeout=10)
        assert edit.params["text"] == t("language.set", "en")
        assert (await _say(fake, ann, "/help")).params["text"].startswith(t("core.help_header", "en"))

        unknown_language = await _say(fake, ann, "/language fr")
        assert unknown_language.params["text"].startswith(t("language.unknown", "en", wanted="fr", choices="")[:20])
        assert await service.storage.language_choice(f"telegram:{ANN}") == ("en", True)


async def test_without_a_choice_the_app_language_is_followed(fake_telegram, settings) -> None:
    fake = fake_telegram
    async with open_service(settings) as service:
        reply = await _say(fake, FakeUser(BOB, language_code="zh-hans"), "/help")
        assert reply.params["text"].startswith(t("core.help_header", "zh"))
        assert await service.storage.language_choice(f"telegram:{BOB}") == ("zh", False)
        # Bob switches his app to English: replies follow, and so does the stored language (job messages).
        reply = await _say(fake, FakeUser(BOB, language_code="en"), "/help")
        assert reply.params["text"].startswith(t("core.help_header", "en"))
        assert await service.storage.language_choice(f"telegram:{BOB}") == ("en", False)
        # An app that reports no language: the last one stored.
        reply = await _say(fake, FakeUser(BOB, language_code=None), "/help")
        assert reply.params["text"].startswith(t("core.help_header", "en"))


async def test_command_menus_are_published_per_language(fake_telegram, settings) -> None:
    async with open_service(settings):
        menus = {c.params.get("language_code"): c.params["commands"] for c in fake_telegram.calls_of("setMyCommands")}
    assert set(menus) == {None, "zh"}
    for code, lang in ((None, "en"), ("zh", "zh")):
        entry = next(c for c in menus[code] if c["command"] == "language")
        assert entry["description"] == t("help.language", lang)


async def test_discord_slash_descriptions_are_localised() -> None:
    translator = CatalogueTranslator()
    text = described("help.language")
    context = app_commands.TranslationContext(app_commands.TranslationContextLocation.command_description, None)
    assert text.message == t("help.language", "en")
    assert await translator.translate(text, discord.Locale.chinese, context) == t("help.language", "zh")
    assert await translator.translate(text, discord.Locale.french, context) is None
