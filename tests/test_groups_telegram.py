"""Groups on Telegram through the whole service (storage, scheduler, worker, real PTB Application)
against the fake Bot API: each member's identity is their own, answers reply to the requester,
group admins set the group's rules, and a group's rate limit delays results without losing any."""
from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from bot.app import open_service
from bot.platforms.telegram_adapter import TelegramAdapter
from bot.engine.jobkinds import GENERATE, INTERACTIVE, JobKind
from bot.ops.logsetup import configure_logging
from facechain_core.devtools import SleepPipeline
from facechain_core.pipeline import JobResult, Progress
from handlers import router
from handlers.chat_settings import chat_settings, switchable_commands
from handlers.messages import t
from handlers.progress import submit_with_progress
from handlers.protocols import Chat, Event, ReplyChannel
from handlers.services import Services
from tests.fixtures.fake_telegram import BOT_USERNAME, ApiCall, FakeTelegram, FakeUser, button_payloads

pytestmark = pytest.mark.timeout(120)

ANN, BOB = FakeUser(515001, "Ann"), FakeUser(515002, "Bob")
GROUP = -100515
SLEEP_KIND = JobKind("test.sleep", "facechain_core.devtools:SleepPipeline", GENERATE, 2, 60)
# The portrait and identity kinds run stand-ins: the chat side of /style is under test here.
PORTRAIT = JobKind("portrait", "tests.test_groups_telegram:PortraitStandIn", GENERATE, 2, 60)
IDENTITY = JobKind("identity", "facechain_core.devtools:SleepPipeline", INTERACTIVE, 2, 60)
FEATURES = {"selfie", "portrait", "cartoon"}


class PortraitStandIn(SleepPipeline):
    """Stands in for the portrait pipeline (in the worker): one small PNG per portrait asked for."""

    def run(self, params: dict, progress: Progress) -> JobResult:
        """Reports a step, then writes `count` PNGs of distinct colours."""
        done = super().run({**params, "steps": 1, "delay_s": 0.0}, progress)
        Path(done.files[0]).unlink()
        files = []
        for index in range(int(params.get("count", 1))):
            path = Path(params["out_dir"]) / f"portrait_{index}.png"
            Image.new("RGB", (48, 64), (50 * index, 90, 160)).save(path)
            files.append(path)
        return JobResult(files=files, meta=done.meta)


@pytest.fixture
def render_command() -> Iterator[None]:
    """A test-only /render command: a quick test.sleep job with one PNG result."""
    async def render(services: Services, event: Event, channel: ReplyChannel) -> None:
        await submit_with_progress(services, event, channel, "test.sleep", {"steps": 1, "suffix": ".png"})
    router.register_command("render", render, "help.help", in_menu=False)
    yield
    router._commands.pop("render", None)


@pytest.fixture
def portrait_ready(monkeypatch: pytest.MonkeyPatch) -> None:
    """Makes the service believe the portrait and cartoon models are installed."""
    monkeypatch.setattr("bot.app.installed_features", lambda *args, **kwargs: set(FEATURES))


def settings_for(fake: FakeTelegram, tmp_path: Path, yunet_path: Path, **fields: Any) -> Any:
    settings = fake.bot_settings(data_dir=tmp_path / "data", models_dir=yunet_path.parent, log_level="DEBUG",
                                 selfie={"detector_model": yunet_path.name}, **fields)
    configure_logging(settings)
    return settings


def replied_id(call: ApiCall) -> int | None:
    reply = call.params.get("reply_parameters")
    return int(reply["message_id"]) if isinstance(reply, dict) else None


def in_chat(chat: int):
    return lambda call: int(call.params.get("chat_id", 0)) == chat


async def say(fake: FakeTelegram, user: FakeUser, chat: int | None, text: str, **extra: Any) -> tuple[dict, ApiCall]:
    """`user` sends `text`; returns their message and the bot's first text answer in that chat."""
    mark = fake.mark()
    message = fake.send_message(user, chat, text, **extra)
    answer = await fake.wait_for("sendMessage", in_chat(chat if chat is not None else user.id), since=mark,
                                 timeout=15)
    return message, answer


async def private_selfie(fake: FakeTelegram, user: FakeUser, photo: bytes) -> None:
    mark = fake.mark()
    fake.send_photo(user, None, photo)
    reply = await fake.wait_for("sendMessage", in_chat(user.id), since=mark, timeout=15)
    assert "1" in reply.params["text"], reply.params["text"]


async def jobs_of(service: Any, user: FakeUser, kind: str | None = None) -> list[Any]:
    states = ["queued", "running", "done", "delivered", "failed", "cancelled"]
    jobs = await service.storage.user_jobs(f"telegram:{user.id}", states)
    return [j for j in jobs if kind is None or j.kind == kind]


async def test_every_member_is_only_themselves(fake_telegram: FakeTelegram, tmp_path: Path, yunet_path: Path,
                                               faces_dir: Path, portrait_ready: None) -> None:
    fake = fake_telegram
    settings = settings_for(fake, tmp_path, yunet_path, scheduler={"progress_interval_s": 0})
    face = (faces_dir / "obama.jpg").read_bytes()
    async with open_service(settings, extra_kinds=[PORTRAIT, IDENTITY]) as service:
        await private_selfie(fake, ANN, face)

        # Ann's plain photo in the group is neither downloaded nor kept: she is asked to send it privately.
        downloads = len(fake.calls_of("getFile"))
        mark = fake.mark()
        photo = fake.send_photo(ANN, GROUP, face)
        hint = await fake.wait_for("sendMessage", in_chat(GROUP), since=mark, timeout=10)
        assert hint.params["text"] == t("intake.group", "en", name="Ann")
        assert replied_id(hint) == photo["message_id"]
        assert len(await service.storage.selfies(f"telegram:{ANN.id}")) == 1
        assert len(fake.calls_of("getFile")) == downloads

        # Bob has no selfies: his /style in the group tells him to register; nothing runs on Ann's face.
        command, answer = await say(fake, BOB, GROUP, "/style hanfu")
        assert answer.params["text"] == t("portrait.need_selfie", "en") and replied_id(answer) == command["message_id"]
        assert await jobs_of(service, BOB) == []

        # Ann's /style@BotName in the group: the queued notice and the result reply to her command.
        mark = fake.mark()
        command = fake.send_message(ANN, GROUP, f"/style@{BOT_USERNAME} hanfu 1")
        queued = await fake.wait_for("sendMessage", in_chat(GROUP), since=mark, timeout=10)
        result = await fake.wait_for("sendPhoto", in_chat(GROUP), since=mark, timeout=30)
        assert replied_id(queued) == replied_id(result) == command["message_id"]
        assert result.result["reply_to_message"]["from"]["id"] == ANN.id
        (ann_job,) = await jobs_of(service, ANN, "portrait")
        assert f"telegram:{ANN.id}" in ann_job.params["identity"]
        more = next(p for p in button_payloads(result.result) if p.startswith("more:"))

        # Bob pressing Ann's button is refused, and nothing is queued for him.
        mark = fake.mark()
        fake.press_button(result.result, more, user=BOB)
        refusal = await fake.wait_for("answerCallbackQuery", since=mark, timeout=10)
        assert refusal.params["text"] == t("button.not_yours", "en") and refusal.params["show_alert"] is True
        # Bob replying /cartoon to Ann's photo, or to Ann's result, is refused too.
        _, answer = await say(fake, BOB, GROUP, "/cartoon anime", reply_to_message=photo)
        assert answer.params["text"] == t("cartoon.not_yours", "en")
        _, answer = await say(fake, BOB, GROUP, "/cartoon anime", reply_to_message=result.result)
        assert answer.params["text"] == t("cartoon.not_yours", "en")
        await fake.wait_idle()
        assert await jobs_of(service, BOB) == []

        # Once Bob registers privately, his /style in the group runs on his own identity, never Ann's.
        await private_selfie(fake, BOB, (faces_dir / "biden.jpg").read_bytes())
        mark = fake.mark()
        command = fake.send_message(BOB, GROUP, "/style hanfu 1")
        bob_result = await fake.wait_for("sendPhoto", in_chat(GROUP), since=mark, timeout=30)
        assert replied_id(bob_result) == command["message_id"]
        (bob_job,) = await jobs_of(service, BOB, "portrait")
        assert f"telegram:{BOB.id}" in bob_job.params["identity"] and str(ANN.id) not in bob_job.params["identity"]
        assert [s["path"] for s in bob_job.params["selfies"]] == \
            [s.path for s in await service.storage.selfies(f"telegram:{BOB.id}")]
        await fake.wait_idle()


async def test_group_admins_set_the_rules(fake_telegram: FakeTelegram, tmp_path: Path, yunet_path: Path,
                                          render_command: None, portrait_ready: None) -> None:
    fake = fake_telegram
    fake.set_admins(GROUP, [ANN])
    settings = settings_for(fake, tmp_path, yunet_path, scheduler={"progress_interval_s": 0})
    chat = Chat("telegram", str(GROUP), False)
    async with open_service(settings, extra_kinds=[SLEEP_KIND]) as service:
        # Only an admin gets the panel; /settings in a private chat points to the group.
        _, answer = await say(fake, BOB, GROUP, "/settings")
        assert answer.params["text"] == t("groups.admins_only", "en")
        _, answer = await say(fake, ANN, None, "/settings")
        assert answer.params["text"] == t("groups.settings_private", "en")
        _, panel = await say(fake, ANN, GROUP, f"/settings@{BOT_USERNAME}")
        assert t("groups.title", "en") in panel.params["text"]
        assert {"cset:safe", "cset:limit.1", "cset:cmds"} <= set(button_payloads(panel.result))

        # A member who is no admin cannot press the panel's buttons.
        mark = fake.mark()
        fake.press_button(panel.result, "cset:safe", user=BOB)
        refusal = await fake.wait_for("answerCallbackQuery", since=mark, timeout=10)
        assert refusal.params["text"] == t("groups.admins_only", "en") and refusal.params["show_alert"]
        assert (await chat_settings(service.services, chat))["safe_mode"] is False

        # The admin switches safe mode on, sets one job a day per member, and switches /cartoon off.
        edits = {}
        for payload in ("cset:safe", "cset:limit.1", "cset:cmds", "cset:cmd.cartoon"):
            mark = fake.mark()
            fake.press_button(panel.result, payload, user=ANN)
            edits[payload] = edit = await fake.wait_for("editMessageText", since=mark, timeout=10)
        assert "cset:all" in button_payloads(edit.result)
        # No safety checker is installed here: the panel says pictures will be refused in this group.
        assert t("groups.safe_no_checker", "en") not in panel.params["text"]
        assert t("groups.safe_no_checker", "en") in edits["cset:safe"].params["text"]
        assert await chat_settings(service.services, chat) == {
            "safe_mode": True, "daily_limit": 1,
            "allowed_commands": [c for c in switchable_commands() if c != "cartoon"]}

        # The rules hold for members: /cartoon is off, jobs carry safe_mode, one job a day.
        _, answer = await say(fake, BOB, GROUP, "/cartoon anime")
        assert answer.params["text"] == t("groups.command_off", "en", command="cartoon")
        mark = fake.mark()
        fake.send_message(BOB, GROUP, "/render")
        await fake.wait_for("sendPhoto", in_chat(GROUP), since=mark, timeout=30)
        (job,) = await jobs_of(service, BOB)
        assert job.params["safe_mode"] is True
        _, answer = await say(fake, BOB, GROUP, "/render")
        assert answer.params["text"] == t("groups.daily_limit", "en", limit=1)
        assert len(await jobs_of(service, BOB)) == 1
        # In his private chat the group's rules do not apply.
        mark = fake.mark()
        fake.send_message(BOB, None, "/render")
        await fake.wait_for("sendPhoto", in_chat(BOB.id), since=mark, timeout=30)
        private_job = max(await jobs_of(service, BOB), key=lambda j: j.id)
        assert "safe_mode" not in private_job.params
        await fake.wait_idle()


async def test_many_results_in_one_group_arrive_in_order(fake_telegram: FakeTelegram, tmp_path: Path,
                                                         yunet_path: Path, render_command: None) -> None:
    fake = fake_telegram
    # Telegram (the fake) allows 8 sends per second into a group; the bot is set to 6.
    fake.limit_groups(8, 1.0, retry_after=1)
    settings = settings_for(fake, tmp_path, yunet_path, telegram={"group_max_rate": 6, "group_time_period": 1},
                            scheduler={"progress_interval_s": 30, "user_max_queued": 8})
    count = 6
    async with open_service(settings, extra_kinds=[SLEEP_KIND]):
        await fake.wait_idle()
        fake.fail_next("sendPhoto", 1, retry_after=1)  # a 429 the limiter did not see coming
        commands = [fake.send_message(ANN, GROUP, "/render") for _ in range(count)]
        await fake.wait_for_count("sendPhoto", count, timeout=60)
        await fake.wait_idle(quiet=0.5, timeout=20)
    group_calls = [c for c in fake.calls if c.method != "getUpdates" and in_chat(GROUP)(c)]
    results = [c for c in group_calls if c.method == "sendPhoto"]
    assert [replied_id(c) for c in results if c.ok] == [m["message_id"] for m in commands]
    refused = [c for c in results if c.status == 429]
    assert refused, "the injected 429 was not seen"
    # Every refused send was retried: no result lost, none sent twice.
    assert len([c for c in results if c.ok]) == count
    assert all(c.ok or c.status == 429 for c in group_calls)


async def test_a_flooding_member_is_told_once_to_slow_down(fake_telegram: FakeTelegram, tmp_path: Path,
                                                           yunet_path: Path) -> None:
    fake = fake_telegram
    settings = settings_for(fake, tmp_path, yunet_path, limits={"commands_per_minute": 3})
    async with open_service(settings):
        for _ in range(10):
            fake.send_message(BOB, GROUP, "/help")
        await fake.wait_for_count("sendMessage", 4, timeout=15)
        await fake.wait_idle(quiet=0.5)
        # Ann is not slowed down by Bob's flood.
        _, answer = await say(fake, ANN, GROUP, "/help")
        assert answer.params["text"].startswith(t("core.help_header", "en"))
    texts = [c.params["text"] for c in fake.calls_of("sendMessage") if in_chat(GROUP)(c)]
    assert texts.count(t("core.rate_limited", "en")) == 1
    assert sum(text.startswith(t("core.help_header", "en")) for text in texts) == 3 + 1


async def test_edits_waiting_for_a_groups_turn_merge(fake_telegram: FakeTelegram, tmp_path: Path) -> None:
    """Progress edits of one message queued behind the group's limit become one edit (the newest text),
    so they never pile up in front of a result; sends keep their order."""
    fake = fake_telegram
    settings = fake.bot_settings(data_dir=tmp_path / "data", telegram={"group_max_rate": 2, "group_time_period": 1})

    async def ignore(event: Event, channel: ReplyChannel) -> None:
        return None

    async with TelegramAdapter(settings, dispatch=ignore) as adapter:
        channel = adapter.channel_for(Chat("telegram", str(GROUP), False))
        progress = await channel.send_text("step 0")
        mark = fake.mark()
        await asyncio.gather(*(channel.edit_text(progress, f"step {i}") for i in range(1, 11)),
                             channel.send_text("result"))
    calls = [c for c in fake.calls[mark:] if c.method in ("editMessageText", "sendMessage")]
    assert [(c.method, c.params["text"]) for c in calls] == [
        ("editMessageText", "step 1"), ("editMessageText", "step 10"), ("sendMessage", "result")]
    assert fake.messages[(GROUP, int(progress.message_id))]["text"] == "step 10"


async def test_daily_quota_is_atomic_refundable_and_deleted_with_the_user(tmp_path: Path) -> None:
    from bot.storage import Storage

    group, ann, bob = "telegram:-1", f"telegram:{ANN.id}", f"telegram:{BOB.id}"
    async with Storage(tmp_path / "db.sqlite3") as storage:
        taken = await asyncio.gather(*(storage.take_chat_quota(group, ann, "2030-01-01", 3) for _ in range(5)))
        assert sorted(taken) == [False, False, True, True, True]
        await storage.refund_chat_quota(group, ann, "2030-01-01")
        assert await storage.take_chat_quota(group, ann, "2030-01-01", 3)
        assert not await storage.take_chat_quota(group, ann, "2030-01-01", 3)
        assert await storage.take_chat_quota(group, bob, "2030-01-01", 3)  # each member counts alone
        assert await storage.take_chat_quota(group, ann, "2030-01-02", 3)  # a new day starts afresh
        assert await storage.chat_jobs_today(group, ann, "2030-01-01") == 0  # and yesterday's rows are gone
        await storage.ensure_user(ann, "telegram", "en")
        assert (await storage.delete_user(ann))["chat_usage"] == 1
        assert await storage.chat_jobs_today(group, bob, "2030-01-01") == 0  # old days are pruned for all
