"""Sharing on Telegram through the whole service and the real PTB Application: inline mode lists a
user's own results only (cached photos by file id, always personal), and the Share button under a
result opens inline mode (or, without it, says how to forward)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bot.app import open_service
from handlers.messages import t
from handlers.sharing import START_PARAMETER
from tests.fixtures.fake_telegram import ApiCall, FakeTelegram
from tests.test_groups_telegram import (
    ANN,
    BOB,
    GROUP,
    IDENTITY,
    PORTRAIT,
    SLEEP_KIND,
    in_chat,
    portrait_ready,  # noqa: F401
    private_selfie,
    render_command,  # noqa: F401
    settings_for,
)

pytestmark = pytest.mark.timeout(90)

CARL = 515003
CACHE_S = 7


async def render(fake: FakeTelegram, user: Any, chat: int | None = None) -> ApiCall:
    mark = fake.mark()
    fake.send_message(user, chat, "/render")
    return await fake.wait_for("sendPhoto", in_chat(chat if chat is not None else user.id), since=mark, timeout=30)


async def inline(fake: FakeTelegram, user: Any, query: str = "") -> ApiCall:
    mark = fake.mark()
    sent = fake.inline_query(user, query)
    return await fake.wait_for("answerInlineQuery", lambda c: c.params["inline_query_id"] == sent["id"],
                               since=mark, timeout=10)


async def results_of(service: Any, user_id: int) -> list[Any]:
    """The user's delivered picture results, newest first, as stored."""
    jobs = await service.storage.user_jobs(f"telegram:{user_id}", ["delivered"])
    found = [a for job in jobs for a in await service.storage.job_artifacts(job.id)
             if a.media_type.startswith("image/")]
    return sorted(found, key=lambda a: a.created_at, reverse=True)


async def test_inline_mode_offers_each_user_only_their_own_results(
        fake_telegram: FakeTelegram, tmp_path: Path, yunet_path: Path, render_command: None) -> None:  # noqa: F811
    fake = fake_telegram
    fake.enable_inline_mode()
    settings = settings_for(fake, tmp_path, yunet_path, telegram={"inline_cache_s": CACHE_S},
                            scheduler={"progress_interval_s": 0})
    async with open_service(settings, extra_kinds=[SLEEP_KIND]) as service:
        for user, chat in ((ANN, None), (BOB, None), (ANN, GROUP), (BOB, None)):
            await render(fake, user, chat)
        await fake.wait_idle()
        ann, bob = await results_of(service, ANN.id), await results_of(service, BOB.id)
        assert len(ann) == len(bob) == 2

        answers = {user.id: await inline(fake, user) for user in (ANN, BOB)}
        for user, own in ((ANN, ann), (BOB, bob)):
            answer = answers[user.id]
            assert [r["id"] for r in answer.params["results"]] == [a.id for a in own]
            assert [r["photo_file_id"] for r in answer.params["results"]] == [a.file_ids["telegram"] for a in own]
            assert {r["type"] for r in answer.params["results"]} == {"photo"}
        # A query naming a result puts it first; naming someone else's result shows nothing of theirs.
        oldest = ann[-1].id
        first = await inline(fake, ANN, oldest)
        assert [r["id"] for r in first.params["results"]] == [oldest, ann[0].id]
        nosy = await inline(fake, BOB, oldest)
        assert [r["id"] for r in nosy.params["results"]] == [a.id for a in bob]
        # Someone without results is offered a button into the private chat instead.
        empty = await inline(fake, CARL)
        assert empty.params["results"] == []
        assert empty.params["button"] == {"text": t("sharing.inline_start", "en"), "start_parameter": START_PARAMETER}

    answers = fake.calls_of("answerInlineQuery")
    assert len(answers) == 5
    assert all(c.params["is_personal"] is True and c.params["cache_time"] == CACHE_S for c in answers)


async def test_refused_users_get_no_inline_results(fake_telegram: FakeTelegram, tmp_path: Path,
                                                   yunet_path: Path) -> None:
    fake = fake_telegram
    fake.enable_inline_mode()
    settings = settings_for(fake, tmp_path, yunet_path, access={"allowed_users": [f"telegram:{ANN.id}"]})
    async with open_service(settings):
        answer = await inline(fake, BOB)
        await fake.wait_idle()
    assert answer.params["results"] == [] and answer.params["is_personal"] is True
    assert "button" not in answer.params
    assert fake.calls_of("sendMessage") == []  # nothing is said in any chat about an inline query


@pytest.mark.parametrize("inline_mode", [True, False])
async def test_the_share_button_under_a_result(fake_telegram: FakeTelegram, tmp_path: Path, yunet_path: Path,
                                               faces_dir: Path, portrait_ready: None,  # noqa: F811
                                               inline_mode: bool) -> None:
    fake = fake_telegram
    fake.enable_inline_mode(inline_mode)
    settings = settings_for(fake, tmp_path, yunet_path, scheduler={"progress_interval_s": 0})
    async with open_service(settings, extra_kinds=[PORTRAIT, IDENTITY]) as service:
        await private_selfie(fake, ANN, (faces_dir / "obama.jpg").read_bytes())
        mark = fake.mark()
        fake.send_message(ANN, None, "/style hanfu 1")
        result = await fake.wait_for("sendPhoto", since=mark, timeout=30)
        await fake.wait_idle()
        (artifact,) = await results_of(service, ANN.id)
        buttons = [b for row in result.params["reply_markup"]["inline_keyboard"] for b in row]
        share = next(b for b in buttons if b["text"] == t("sharing.button", "en"))
        if inline_mode:
            # The button opens inline mode with the result named: picking a chat shares it from there.
            assert share == {"text": t("sharing.button", "en"), "switch_inline_query": artifact.id}
            answer = await inline(fake, ANN, share["switch_inline_query"])
            assert answer.params["results"][0]["id"] == artifact.id
            # The photo keeps no metadata in Telegram: the AI note goes in its caption, with the Report button.
            shared = answer.params["results"][0]
            assert "AI-generated" in shared["caption"]
            assert shared["reply_markup"]["inline_keyboard"] == [[{"text": t("safety.report_button", "en"),
                                                                   "callback_data": f"report:{artifact.id}"}]]
            mark = fake.mark()
            fake.press_inline_button(BOB, f"report:{artifact.id}")  # someone in the chat it was shared to
            note = await fake.wait_for("answerCallbackQuery", since=mark, timeout=10)
            assert note.params["text"] == t("safety.reported", "en")
        else:
            assert share["callback_data"] == f"share:{artifact.id}"
            mark = fake.mark()
            fake.press_button(result.result, share["callback_data"])
            hint = await fake.wait_for("answerCallbackQuery", since=mark, timeout=10)
            assert hint.params["text"] == t("sharing.forward_hint", "en") and hint.params["show_alert"]
        await fake.wait_idle()
