"""Duo and group portraits through the whole service (storage, scheduler, worker process, handlers) and the
real python-telegram-bot and discord.py clients against their fakes, on tiny models of the real formats:
the consent flow (yes, no, no answer in time, a third member's press, a blocked requester), no job without
every yes, the result in the chat with the AI label and owned by everyone in it, and one person's /delete
removing it for all with the deletion proof holding for both.

One service with both adapters serves the module; each test has users of its own."""
from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from bot.app import open_service
from facechain_core.tiny import build_identity
from facechain_core.tiny.duo import build_duo_models
from facechain_core.tiny.pose import build_pose
from facechain_core.tiny.tryon import build_controlnet, build_sd15_inpaint
from handlers.messages import t
from tests.conftest import SHARED, find_asset
from tests.fixtures.fake_discord import FakeDiscord
from tests.fixtures.fake_discord import FakeUser as DiscordUser
from tests.fixtures.fake_platforms import fake_platforms
from tests.fixtures.fake_telegram import FakeTelegram, FakeUser
from tests.fixtures.portrait_service import TINY_PIPELINE, tiny_model_paths
from tests.fixtures.privacy import user_traces
from tests.fixtures.tiny_models import one_torch_thread, tiny_models_dir  # noqa: F401

pytestmark = [pytest.mark.timeout(300), pytest.mark.asyncio(loop_scope="module")]

GROUP = -100777
TIMEOUT_S = 12.0  # [duo] consent_timeout_s here: long enough for a press on a loaded 2-core machine


@dataclass
class World:
    service: Any
    telegram: FakeTelegram
    discord: FakeDiscord

    @property
    def db(self) -> Path:
        return self.service.settings.db_path


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def world(tmp_path_factory: pytest.TempPathFactory, tiny_models_dir: Path,  # noqa: F811
                one_torch_thread: None) -> AsyncIterator[World]:  # noqa: F811
    yunet = find_asset("models/yunet_s_640_640.onnx")
    duo = build_duo_models(tmp_path_factory.mktemp("duo_models"))
    # The template models (/duo with a two-face library template): inpainting, depth ControlNet, DWPose.
    inpaint = tmp_path_factory.mktemp("duo_template_models")
    build_sd15_inpaint(inpaint / "sd15-inpainting")
    build_controlnet(inpaint / "depth", inpaint / "sd15-inpainting")
    build_pose(inpaint / "dwpose.onnx")
    paths = {**tiny_model_paths(tiny_models_dir, yunet), "sd15": duo["sd15"],
             "ip-adapter-faceid-sd15": duo["ip-adapter-faceid-sd15"],
             "controlnet-openpose-sd15": duo["controlnet-openpose-sd15"],
             "sd15-inpainting": inpaint / "sd15-inpainting", "controlnet-depth-sd15": inpaint / "depth",
             "dwpose-wholebody": inpaint / "dwpose.onnx", "template-two_sisters": SHARED / "faces" / "two_people.jpg"}
    async with fake_platforms() as (telegram, discord):
        settings = telegram.bot_settings(
            discord=discord.discord_settings(), data_dir=tmp_path_factory.mktemp("duo_data"),
            models_dir=tiny_models_dir, model_paths=paths, selfie={"detector_model": str(yunet)},
            scheduler={"progress_interval_s": 0}, limits={"commands_per_minute": 0},
            pipeline={**TINY_PIPELINE, "oversample": 1, "duo_min_similarity": -1.0,
                      "template": {"side": 64, "steps": 2}}, portrait_seed=1234,
            duo={"consent_timeout_s": TIMEOUT_S},
            # Every test talks in one group: Telegram's 20 messages a minute per group would hold sends back.
            telegram={"group_max_rate": 1000})
        async with open_service(settings) as service:
            yield World(service, telegram, discord)


async def _with_identity(world: World, key: str, seed: int) -> None:
    """A user with a face profile (as the identity job leaves it), without the selfie round trip."""
    storage = world.service.storage
    platform = key.partition(":")[0]
    await storage.ensure_user(key, platform, "en")
    path = build_identity(world.service.services.user_dir(key) / "identity.npz", seed)
    await storage.set_identity(key, str(path), 1)


def _duo_jobs(world: World) -> list[sqlite3.Row]:
    with sqlite3.connect(world.db) as db:
        db.row_factory = sqlite3.Row
        return db.execute("SELECT * FROM jobs WHERE kind = 'duo'").fetchall()


def _in_chat(chat: int, text: str | None = None) -> Any:
    def match(call: Any) -> bool:
        return str(call.params.get("chat_id")) == str(chat) and (text is None or text in str(call.params.get("text")))
    return match


async def _ask(world: World, requester: FakeUser, partner: FakeUser, command: str = "/duo hanfu") -> tuple[str, Any]:
    """`requester` replies to `partner`'s message with /duo; returns the request id and the group request."""
    fake = world.telegram
    said = fake.send_message(partner, GROUP, "hello")
    mark = fake.mark()
    fake.send_message(requester, GROUP, command, reply_to_message=said)
    request = await fake.wait_for("sendMessage", lambda c: any(b.startswith("duoyes:") for b in c.buttons),
                                  since=mark, timeout=15)
    return request.buttons[0].partition(":")[2], request


async def _press(world: World, call: Any, payload: str, user: FakeUser) -> Any:
    fake = world.telegram
    mark = fake.mark()
    fake.press_button(call.result, payload, user)
    return await fake.wait_for("answerCallbackQuery", since=mark, timeout=15)


# -- Telegram ---------------------------------------------------------------------------------------

async def test_yes_makes_the_picture_for_both_and_a_third_member_cannot_answer(world: World) -> None:
    ann, bob, cat = FakeUser(811, "Ann"), FakeUser(812, "Bob"), FakeUser(813, "Cat")
    for user, seed in ((ann, 1), (bob, 2), (cat, 3)):
        await _with_identity(world, f"telegram:{user.id}", seed)
    fake = world.telegram
    mark = fake.mark()
    request_id, request = await _ask(world, ann, bob)
    text = request.params["text"]
    assert "Bob" in text and "Ann" in text and "/delete" in text  # names both, says what will happen
    # Bob also gets the request privately, with the same buttons.
    private = await fake.wait_for("sendMessage", lambda c: _in_chat(bob.id)(c) and c.buttons, since=mark)
    assert private.buttons == [f"duoyes:{request_id}", f"duono:{request_id}"]
    # A third member's press is refused and changes nothing.
    refused = await _press(world, request, f"duoyes:{request_id}", cat)
    assert refused.params["text"] == t("duo.not_for_you", "en") and refused.params["show_alert"]
    await fake.wait_idle()
    assert [j for j in _duo_jobs(world) if j["user_key"] == f"telegram:{ann.id}"] == []
    # Bob's yes starts the job, as Ann's; the picture reaches the group with the AI label.
    mark = fake.mark()
    await _press(world, request, f"duoyes:{request_id}", bob)
    photo = await fake.wait_for("sendMediaGroup", _in_chat(GROUP), since=mark, timeout=120)
    caption = json.dumps(photo.params["media"])
    assert "AI" in caption  # the AI-generated note of every result's caption
    jobs = [j for j in _duo_jobs(world) if j["user_key"] == f"telegram:{ann.id}"]
    assert len(jobs) == 1 and json.loads(jobs[0]["params"])["owners"] == [f"telegram:{ann.id}", f"telegram:{bob.id}"]
    artifacts = await world.service.storage.job_artifacts(jobs[0]["id"])
    assert artifacts and all(a.owned_by(f"telegram:{bob.id}") and a.owned_by(f"telegram:{ann.id}")
                             and not a.owned_by(f"telegram:{cat.id}") for a in artifacts)
    # Each person in it finds it among their own results to share (inline mode); nobody else does.
    await fake.wait_idle()
    fake.enable_inline_mode()
    try:
        for user, sees in ((bob, True), (ann, True), (cat, False)):
            mark = fake.mark()
            sent = fake.inline_query(user, "")
            answer = await fake.wait_for("answerInlineQuery", lambda c: c.params["inline_query_id"] == sent["id"],
                                         since=mark, timeout=10)
            shown = {r["id"] for r in answer.params["results"]}
            assert ({a.id for a in artifacts} <= shown) is sees and (not shown & {a.id for a in artifacts}) is not sees
    finally:
        fake.enable_inline_mode(False)
    # The request is over: a late press is refused.
    late = await _press(world, request, f"duono:{request_id}", bob)
    assert late.params["text"] == t("duo.over", "en")

    # One person's /delete removes it for everyone; the other is told; the proof holds for both.
    mark = fake.mark()
    fake.send_message(bob, None, "/delete")
    confirm = await fake.wait_for("sendMessage", lambda c: _in_chat(bob.id)(c) and c.buttons, since=mark)
    fake.press_button(confirm.result, confirm.buttons[0], bob)
    await fake.wait_for("sendMessage", _in_chat(ann.id, t("duo.deleted_by_other", "en")), since=mark, timeout=15)
    for artifact in artifacts:
        assert await world.service.storage.artifact(artifact.id) is None
        assert not Path(artifact.path).exists()
    data_dir = world.service.settings.data_dir
    assert user_traces(data_dir, world.db, [f"telegram:{bob.id}"]) == []
    mark = fake.mark()
    fake.send_message(ann, None, "/delete")
    confirm = await fake.wait_for("sendMessage", lambda c: _in_chat(ann.id)(c) and c.buttons, since=mark)
    fake.press_button(confirm.result, confirm.buttons[0], ann)
    await fake.wait_for("editMessageText", _in_chat(ann.id, t("delete.done", "en")), since=mark, timeout=15)
    assert user_traces(data_dir, world.db, [f"telegram:{ann.id}", f"telegram:{bob.id}"]) == []


async def test_a_two_face_template_is_filled_with_both(world: World) -> None:
    if not (SHARED / "faces" / "two_people.jpg").is_file():
        pytest.skip("../shared/faces/two_people.jpg not present")
    ann, bob = FakeUser(871, "Ann"), FakeUser(872, "Bob")
    await _with_identity(world, f"telegram:{ann.id}", 14)
    await _with_identity(world, f"telegram:{bob.id}", 15)
    request_id, request = await _ask(world, ann, bob, "/duo two_sisters")
    assert "Two Sisters" in request.params["text"]
    mark = world.telegram.mark()
    await _press(world, request, f"duoyes:{request_id}", bob)
    photo = await world.telegram.wait_for("sendMediaGroup", _in_chat(GROUP), since=mark, timeout=120)
    assert "AI" in json.dumps(photo.params["media"])
    with sqlite3.connect(world.db) as db:
        (job_id, params) = db.execute("SELECT id, params FROM jobs WHERE kind = 'duo_template' AND user_key = ?",
                                      (f"telegram:{ann.id}",)).fetchone()
    assert json.loads(params)["template_id"] == "two_sisters"
    artifacts = await world.service.storage.job_artifacts(job_id)
    assert artifacts and all(a.owned_by(f"telegram:{bob.id}") for a in artifacts)


async def test_no_makes_nothing_and_the_requester_is_told(world: World) -> None:
    ann, bob = FakeUser(821, "Ann"), FakeUser(822, "Bob")
    await _with_identity(world, f"telegram:{ann.id}", 4)
    await _with_identity(world, f"telegram:{bob.id}", 5)
    request_id, request = await _ask(world, ann, bob)
    mark = world.telegram.mark()
    answer = await _press(world, request, f"duono:{request_id}", bob)
    assert answer.params["text"] == t("duo.thanks_no", "en")
    await world.telegram.wait_for("sendMessage", _in_chat(GROUP, t("duo.declined", "en", name="Bob")), since=mark)
    assert [j for j in _duo_jobs(world) if j["user_key"] == f"telegram:{ann.id}"] == []
    assert (await world.service.storage.duo_request(request_id)).state == "declined"


async def test_no_answer_in_time_makes_nothing(world: World) -> None:
    ann, bob = FakeUser(831, "Ann"), FakeUser(832, "Bob")
    await _with_identity(world, f"telegram:{ann.id}", 6)
    await _with_identity(world, f"telegram:{bob.id}", 7)
    mark = world.telegram.mark()
    request_id, request = await _ask(world, ann, bob)
    # One open question per person: asking again meanwhile is refused.
    bob_said = world.telegram.send_message(bob, GROUP, "again")
    world.telegram.send_message(ann, GROUP, "/duo hanfu", reply_to_message=bob_said)
    await world.telegram.wait_for("sendMessage", _in_chat(GROUP, t("duo.already_asked", "en", name="Bob")),
                                  since=mark)
    await world.telegram.wait_for("sendMessage", _in_chat(GROUP, t("duo.expired", "en")), since=mark,
                                  timeout=TIMEOUT_S + 10)
    assert [j for j in _duo_jobs(world) if j["user_key"] == f"telegram:{ann.id}"] == []
    late = await _press(world, request, f"duoyes:{request_id}", bob)
    assert late.params["text"] == t("duo.over", "en")
    assert [j for j in _duo_jobs(world) if j["user_key"] == f"telegram:{ann.id}"] == []


async def test_a_blocked_requester_cannot_ask(world: World) -> None:
    ann, bob = FakeUser(841, "Ann"), FakeUser(842, "Bob")
    await _with_identity(world, f"telegram:{ann.id}", 8)
    await _with_identity(world, f"telegram:{bob.id}", 9)
    fake = world.telegram
    ann_said = fake.send_message(ann, GROUP, "hi")
    mark = fake.mark()
    fake.send_message(bob, GROUP, "/duo block", reply_to_message=ann_said)
    await fake.wait_for("sendMessage", _in_chat(GROUP, t("duo.blocked_done", "en", name="Ann")), since=mark)
    mark = fake.mark()
    # Named by a tap on Bob's name (text_mention) this time.
    fake.send_message(ann, GROUP, "/duo hanfu Bob", entities=[
        {"type": "text_mention", "offset": 11, "length": 3, "user": {"id": bob.id, "is_bot": False,
                                                                    "first_name": "Bob"}}])
    await fake.wait_for("sendMessage", _in_chat(GROUP, t("duo.blocked", "en", name="Bob")), since=mark)
    await fake.wait_idle()
    assert not any(b.startswith("duoyes:") for c in fake.calls[mark:] for b in c.buttons)
    assert [j for j in _duo_jobs(world) if j["user_key"] == f"telegram:{ann.id}"] == []


async def test_a_partner_without_a_face_profile_is_invited_privately(world: World) -> None:
    ann, dan = FakeUser(851, "Ann"), FakeUser(852, "Dan")
    await _with_identity(world, f"telegram:{ann.id}", 10)
    fake = world.telegram
    dan_said = fake.send_message(dan, GROUP, "hey")
    mark = fake.mark()
    fake.send_message(ann, GROUP, "/duo hanfu", reply_to_message=dan_said)
    await fake.wait_for("sendMessage", _in_chat(GROUP, t("duo.partner_no_identity", "en", names="Dan")), since=mark)
    await fake.wait_for("sendMessage", _in_chat(dan.id, t("duo.invite", "en", requester="Ann")), since=mark)
    assert (await world.service.storage.identity(f"telegram:{dan.id}")) is None


async def test_a_group_can_switch_duo_off(world: World) -> None:
    ann, bob = FakeUser(881, "Ann"), FakeUser(882, "Bob")
    await _with_identity(world, f"telegram:{ann.id}", 16)
    await _with_identity(world, f"telegram:{bob.id}", 17)
    fake, group = world.telegram, GROUP - 1
    fake.set_admins(group, [ann])
    mark = fake.mark()
    fake.send_message(ann, group, "/settings")
    panel = await fake.wait_for("sendMessage", lambda c: _in_chat(group)(c) and c.buttons, since=mark)
    mark = fake.mark()
    fake.press_button(panel.result, "cset:cmd.duo", ann)
    await fake.wait_for("answerCallbackQuery", since=mark)
    ann_said = fake.send_message(ann, group, "hi")
    mark = fake.mark()
    fake.send_message(bob, group, "/duo hanfu", reply_to_message=ann_said)
    await fake.wait_for("sendMessage", _in_chat(group, t("duo.off_here", "en", command="duo")), since=mark)
    await fake.wait_idle()
    assert not any(b.startswith("duoyes:") for c in fake.calls[mark:] for b in c.buttons)


async def test_duo_asked_in_a_private_chat_is_refused(world: World) -> None:
    fake = world.telegram
    mark = fake.mark()
    fake.send_message(FakeUser(861, "Ann"), None, "/duo hanfu")
    await fake.wait_for("sendMessage", _in_chat(861, t("duo.group_only", "en", command="duo")), since=mark)


# -- Discord ----------------------------------------------------------------------------------------

async def test_discord_duo_with_a_partner_option(world: World) -> None:
    fake = world.discord
    ann, bob, cat = DiscordUser(411000000000000001, "ann"), DiscordUser(411000000000000002, "bob"), \
        DiscordUser(411000000000000003, "cat")
    for user, seed in ((ann, 11), (bob, 12), (cat, 13)):
        await _with_identity(world, f"discord:{user.id}", seed)
    guild = fake.add_guild(members=[ann, bob, cat])
    room = fake.guild_channel(int(guild["id"]))
    await fake.wait_connected()
    mark = fake.mark()
    fake.slash(ann, "duo", channel=room, style="hanfu", partner=bob)
    asked = await fake.wait_for("*", r".*", lambda r: any(":duoyes:" in c for c in r.custom_ids()), 20, since=mark)
    custom_yes = next(c for c in asked.custom_ids() if ":duoyes:" in c)
    # Cat, a third member, is refused; nothing is queued.
    fake.press(cat, asked.response, custom_yes)
    await fake.wait_idle()
    assert [j for j in _duo_jobs(world) if j["user_key"] == f"discord:{ann.id}"] == []
    mark = fake.mark()
    fake.press(bob, asked.response, custom_yes)
    result = await fake.wait_for_files(r".*", since=mark, timeout=120)
    # Someone who is not a member of this server cannot be picked: nobody is asked.
    await fake.wait_idle()
    stranger = DiscordUser(411000000000000009, "eve")
    await _with_identity(world, f"discord:{stranger.id}", 19)
    mark_stranger = fake.mark()
    fake.slash(ann, "duo", channel=room, style="hanfu", partner=stranger)
    await fake.wait_for("*", r".*", lambda r: (r.content or "").startswith(t("duo.who", "en", command="duo", most=1)[:20]),
                        20, since=mark_stranger)
    assert not any(":duoyes:" in c for r in fake.requests[mark_stranger:] for c in r.custom_ids())
    assert "AI" in (result.content or "") or "AI" in json.dumps(result.json)
    (job,) = [j for j in _duo_jobs(world) if j["user_key"] == f"discord:{ann.id}"]
    artifacts = await world.service.storage.job_artifacts(job["id"])
    assert artifacts and all(a.owned_by(f"discord:{bob.id}") for a in artifacts)
