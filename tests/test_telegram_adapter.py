"""The Telegram adapter with the real python-telegram-bot Application against the fake Bot API."""
from __future__ import annotations

import io
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from PIL import Image
from skimage import data as skdata
from telegram.error import InvalidToken

from bot.ops.logredact import install_redaction
from bot.platforms.telegram_adapter import TelegramAdapter, parse_command
from handlers import router
from handlers.protocols import Button, Event, Media, MessageRef, NotSupported, ReplyChannel, Visibility
from tests.fixtures.fake_telegram import FakeTelegram, FakeUser, fake_telegram  # noqa: F401
from tests.fixtures.recorder import Recorder

pytestmark = pytest.mark.timeout(60)

Dispatch = Callable[[Event, ReplyChannel], Awaitable[None]]


def jpeg(size: int = 256, shade: int = 0) -> bytes:
    img = Image.fromarray(skdata.astronaut()).resize((size, size))
    if shade:
        img = img.point(lambda v: min(255, v + shade))
    out = io.BytesIO()
    img.save(out, format="JPEG")
    return out.getvalue()


def adapter_for(fake: FakeTelegram, dispatch: Dispatch, **settings: object) -> TelegramAdapter:
    return TelegramAdapter(fake.bot_settings(**settings), dispatch=dispatch)


def test_parse_command_keeps_commands_for_this_bot_only() -> None:
    assert parse_command("/style hanfu 2", "facechain_bot") == ("style", ["hanfu", "2"], True)
    assert parse_command("/Start@FaceChain_Bot", "facechain_bot") == ("start", [], True)
    assert parse_command("/start@other_bot", "facechain_bot") == (None, [], False)
    assert parse_command("hello /start", "facechain_bot") == (None, [], True)


async def test_text_command_becomes_event_and_reply_is_sent(fake_telegram: FakeTelegram) -> None:
    async def pong(event: Event, channel: ReplyChannel) -> None:
        await channel.send_text(f"pong {event.command} {' '.join(event.args)}", [[Button("Again", "again:1")]])

    recorder = Recorder(pong)
    async with adapter_for(fake_telegram, recorder):
        fake_telegram.send_message(FakeUser(42, "Lin", "zh-hans"), None, "/style hanfu 2")
        (event,) = await recorder.wait()
        reply = await fake_telegram.wait_for("sendMessage")
    assert event.user.key == "telegram:42" and event.user.name == "Lin"
    assert event.chat.key == "telegram:42" and event.chat.is_private
    assert (event.command, event.args, event.language) == ("style", ["hanfu", "2"], "zh")
    assert reply.params["chat_id"] == 42 and reply.params["text"] == "pong style hanfu 2"
    assert reply.params["reply_markup"]["inline_keyboard"] == [[{"text": "Again", "callback_data": "again:1"}]]
    menus = fake_telegram.calls_of("setMyCommands")
    assert {c.params.get("language_code") for c in menus} == {None, "zh"}
    default = next(c for c in menus if "language_code" not in c.params)
    assert [c["command"] for c in default.params["commands"]] == [c.name for c in router.commands() if not c.admin_only]
    assert not recorder.errors


async def test_group_message_and_commands_for_other_bots(fake_telegram: FakeTelegram) -> None:
    recorder = Recorder()
    async with adapter_for(fake_telegram, recorder):
        fake_telegram.send_message(5, -100777, "/status@some_other_bot")
        fake_telegram.send_message(5, -100777, "/status@facechain_test_bot")
        (event,) = await recorder.wait()
        await fake_telegram.wait_idle()
    assert len(recorder.events) == 1
    assert event.command == "status" and event.chat.key == "telegram:-100777" and not event.chat.is_private


async def test_photo_is_downloaded_at_its_largest_size(fake_telegram: FakeTelegram) -> None:
    fetched: dict[str, bytes] = {}

    async def fetch(event: Event, channel: ReplyChannel) -> None:
        for attachment in event.attachments:
            fetched[attachment.kind] = await attachment.fetch()

    original, as_file = jpeg(320), jpeg(200, shade=30)
    recorder = Recorder(fetch)
    async with adapter_for(fake_telegram, recorder):
        fake_telegram.send_photo(7, None, original)
        fake_telegram.send_photo(7, None, as_file, as_document=True, filename="me.jpg")
        await recorder.wait(2)
        await fake_telegram.wait_idle()
    photo, document = recorder.events
    assert photo.attachments[0].kind == "photo" and photo.attachments[0].size == len(original)
    assert document.attachments[0].kind == "document"
    assert (document.attachments[0].mime_type, document.attachments[0].filename) == ("image/jpeg", "me.jpg")
    assert fetched == {"photo": original, "document": as_file}
    assert len(fake_telegram.calls_of("getFile")) == 2


async def test_each_photo_of_a_media_group_is_an_event(fake_telegram: FakeTelegram) -> None:
    recorder = Recorder()
    async with adapter_for(fake_telegram, recorder):
        for shade in (0, 20, 40):
            fake_telegram.send_photo(7, None, jpeg(64, shade), media_group_id="album1")
        events = await recorder.wait(3)
    assert [e.attachments[0].kind for e in events] == ["photo"] * 3
    assert len({e.message_id for e in events}) == 3


async def test_voice_and_oversized_files(fake_telegram: FakeTelegram) -> None:
    outcomes: dict[str, object] = {}

    async def fetch(event: Event, channel: ReplyChannel) -> None:
        kind = event.attachments[0].kind
        try:
            outcomes[kind] = await event.attachments[0].fetch()
        except Exception as exc:
            outcomes[kind] = exc

    recorder = Recorder(fetch)
    adapter = adapter_for(fake_telegram, recorder, limits={"max_upload_mb": 0.001})
    async with adapter:
        fake_telegram.send_media(7, None, "voice", b"OggS" + b"\0" * 100, mime="audio/ogg")
        fake_telegram.send_document(7, None, b"x" * 5000, "big.zip", "application/zip")
        await recorder.wait(2)
    assert outcomes["voice"] == b"OggS" + b"\0" * 100
    assert getattr(outcomes["document"], "code", None) == "file.too_large"
    assert len(fake_telegram.calls_of("getFile")) == 1  # the big one is refused before asking


async def test_album_of_twelve_images_is_two_media_groups(fake_telegram: FakeTelegram, tmp_path: Path) -> None:
    paths = []
    for i in range(12):
        path = tmp_path / f"{i}.jpg"
        path.write_bytes(jpeg(48, shade=i * 10))
        paths.append(path)
    sent: list[object] = []

    async def send_album(event: Event, channel: ReplyChannel) -> None:
        sent.extend(await channel.send_images([Media(path=p) for p in paths], caption="Here you go!",
                                              buttons=[[Button("More", "more:abc")]]))

    recorder = Recorder(send_album)
    async with adapter_for(fake_telegram, recorder):
        mark = fake_telegram.mark()
        fake_telegram.send_message(7, None, "/album")
        groups = await fake_telegram.wait_for_count("sendMediaGroup", 2, since=mark)
        follow_up = await fake_telegram.wait_for("sendMessage", since=mark)
        await recorder.wait()
    assert [len(g.params["media"]) for g in groups] == [10, 2]
    captions = [m.get("caption") for g in groups for m in g.params["media"]]
    assert captions == ["Here you go!"] + [None] * 11
    uploaded = [fake_telegram.files[m["_file_id"]] for g in groups for m in g.params["media"]]
    assert uploaded == [p.read_bytes() for p in paths]
    assert follow_up.params["reply_markup"]["inline_keyboard"][0][0]["callback_data"] == "more:abc"
    assert len(sent) == 12 and all(s.file_id for s in sent)  # type: ignore[attr-defined]
    assert not recorder.errors


async def test_single_image_and_resend_by_file_id(fake_telegram: FakeTelegram, tmp_path: Path) -> None:
    path = tmp_path / "one.jpg"
    path.write_bytes(jpeg(40))
    results: list[object] = []

    async def send(event: Event, channel: ReplyChannel) -> None:
        (first,) = await channel.send_images([Media(path=path)], caption="c", buttons=[[Button("Share", "share:x")]])
        (again,) = await channel.send_images([Media(file_id=first.file_id)])
        results.extend([first, again])

    recorder = Recorder(send)
    async with adapter_for(fake_telegram, recorder):
        fake_telegram.send_message(7, None, "/one")
        await recorder.wait()
    first_call, second_call = fake_telegram.calls_of("sendPhoto")
    assert first_call.files["photo"] == path.read_bytes()
    assert first_call.params["reply_markup"]["inline_keyboard"][0][0]["callback_data"] == "share:x"
    assert second_call.params["photo"] == results[0].file_id and not second_call.files  # type: ignore[attr-defined]
    assert not recorder.errors


async def test_other_media_kinds_are_sent(fake_telegram: FakeTelegram, tmp_path: Path) -> None:
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"\0\0\0\x18ftypmp42" + b"\0" * 64)
    sound = tmp_path / "hi.ogg"
    sound.write_bytes(b"OggS" + b"\0" * 64)
    ids: list[str | None] = []

    async def send(event: Event, channel: ReplyChannel) -> None:
        ids.append((await channel.send_video(Media(path=clip), caption="v")).file_id)
        ids.append((await channel.send_video_note(Media(path=clip))).file_id)
        ids.append((await channel.send_audio(Media(path=sound), voice=True)).file_id)
        ids.append((await channel.send_audio(Media(path=sound), caption="a")).file_id)
        ids.append((await channel.send_document(Media(path=sound))).file_id)

    recorder = Recorder(send)
    async with adapter_for(fake_telegram, recorder):
        fake_telegram.send_message(7, None, "/media")
        await recorder.wait()
    assert not recorder.errors
    methods = [c.method for c in fake_telegram.calls if c.method.startswith("send")]
    assert methods == ["sendVideo", "sendVideoNote", "sendVoice", "sendAudio", "sendDocument"]
    assert all(ids) and len(set(ids)) == 5
    assert fake_telegram.calls_of("sendVoice")[0].files["voice"] == sound.read_bytes()


async def test_a_429_is_retried_and_the_message_delivered(fake_telegram: FakeTelegram) -> None:
    async def reply(event: Event, channel: ReplyChannel) -> None:
        await channel.send_text("hello after a pause")

    recorder = Recorder(reply)
    async with adapter_for(fake_telegram, recorder):
        fake_telegram.fail_next("sendMessage", times=1, retry_after=1)
        fake_telegram.send_message(7, None, "/start")
        delivered = await fake_telegram.wait_for("sendMessage", timeout=10)
        await recorder.wait()
    attempts = fake_telegram.calls_of("sendMessage", ok_only=False)
    assert [c.status for c in attempts] == [429, 200]
    assert delivered.params["text"] == "hello after a pause"
    assert delivered.at - attempts[0].at >= 0.9  # it waited for retry_after
    assert not recorder.errors


async def test_buttons_round_trip(fake_telegram: FakeTelegram) -> None:
    async def reply(event: Event, channel: ReplyChannel) -> None:
        if event.button_payload is None:
            await channel.send_text("Pick one", [[Button("Yes", "pick:yes"), Button("No", "pick:no")]])
            return
        await channel.answer_button("Picked!", alert=True)
        await channel.answer_button("twice")  # a second answer is dropped
        await channel.edit_text(MessageRef(event.chat, event.message_id or ""), f"You picked {event.button_payload}")

    recorder = Recorder(reply)
    async with adapter_for(fake_telegram, recorder):
        fake_telegram.send_message(9, None, "/pick")
        question = await fake_telegram.wait_for("sendMessage")
        fake_telegram.press_button(question.result, "pick:no")
        edit = await fake_telegram.wait_for("editMessageText")
        await recorder.wait(2)
    press = recorder.events[1]
    assert press.button_payload == "pick:no" and press.user.key == "telegram:9"
    assert press.message_id == str(question.result["message_id"])
    (answer,) = fake_telegram.calls_of("answerCallbackQuery")
    assert answer.params["text"] == "Picked!" and answer.params["show_alert"] is True
    assert edit.params["text"] == "You picked pick:no" and "reply_markup" not in edit.params
    assert fake_telegram.messages[(9, question.result["message_id"])]["text"] == "You picked pick:no"
    assert not recorder.errors


async def test_requester_only_goes_private_or_is_not_supported(fake_telegram: FakeTelegram) -> None:
    outcomes: list[object] = []

    async def reply(event: Event, channel: ReplyChannel) -> None:
        try:
            outcomes.append(await channel.send_text("just for you", visibility=Visibility.REQUESTER))
        except NotSupported as exc:
            outcomes.append(exc)

    recorder = Recorder(reply)
    async with adapter_for(fake_telegram, recorder):
        fake_telegram.send_message(11, -1005, "/secret")
        await recorder.wait()
        fake_telegram.error_next("sendMessage", status=403, description="Forbidden: bot can't initiate conversation")
        fake_telegram.send_message(12, -1005, "/secret")
        await recorder.wait(2)
    ref, refused = outcomes
    assert isinstance(ref, MessageRef) and ref.chat.id == "11" and ref.chat.is_private
    assert fake_telegram.calls_of("sendMessage")[0].params["chat_id"] == 11
    assert isinstance(refused, NotSupported)


async def test_channel_for_reaches_a_chat_without_an_update(fake_telegram: FakeTelegram) -> None:
    from handlers.protocols import Chat

    async with adapter_for(fake_telegram, Recorder()) as adapter:
        channel = adapter.channel_for(Chat("telegram", "31", True))
        ref = await channel.send_text("your result is ready")
        await channel.edit_text(ref, "your result is ready")  # unchanged: Telegram's "not modified" is fine
        await channel.delete_message(ref)
    assert fake_telegram.calls_of("sendMessage")[0].params["chat_id"] == 31
    assert fake_telegram.calls_of("deleteMessage")[0].params["message_id"] == int(ref.message_id)
    assert (31, int(ref.message_id)) not in fake_telegram.messages


async def test_token_never_reaches_logs_or_errors(fake_telegram: FakeTelegram, caplog: pytest.LogCaptureFixture,
                                                  tmp_path: Path) -> None:
    token = fake_telegram.token
    secret_half = token.split(":", 1)[1]
    lines = io.StringIO()
    handler = logging.StreamHandler(lines)
    handler.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="httpx")  # the service quiets httpx below DEBUG; not here
    install_redaction([token])
    errors: list[BaseException] = []

    async def reply(event: Event, channel: ReplyChannel) -> None:
        if event.attachments:
            await event.attachments[0].fetch()
        try:
            await channel.send_text("this send fails")
        except Exception as exc:
            errors.append(exc)
            logging.getLogger("test").exception("send failed for %s", fake_telegram.base_url + token)
        raise RuntimeError(f"boom at {fake_telegram.base_url}{token}/sendMessage")

    try:
        async with adapter_for(fake_telegram, reply):
            fake_telegram.error_next("sendMessage", status=500, description="Internal Server Error")
            fake_telegram.send_photo(7, None, jpeg(64))
            await fake_telegram.wait_for("sendMessage", ok_only=False)
            await fake_telegram.wait_idle()
        bad = adapter_for(fake_telegram, Recorder(), telegram={"token": "1234567890:AAWrongTokenWrongToken1234"})
        with pytest.raises(InvalidToken) as refused:
            await bad.start()
        errors.append(refused.value)
    finally:
        root.removeHandler(handler)
    captured = lines.getvalue() + caplog.text + "\n".join(r.getMessage() for r in caplog.records)
    assert "HTTP Request" in captured and "/bot***/getUpdates" in captured  # httpx did log the URLs
    assert "boom at" in captured and "send failed for" in captured
    assert token not in captured and secret_half not in captured
    assert errors and all(token not in str(e) and secret_half not in str(e) for e in errors)


class _NoJobs:
    """Just enough of a JobQueue for /start and /delete."""

    def __init__(self) -> None:
        self.forgotten: list[str] = []

    async def forget_user(self, user_key: str) -> None:
        self.forgotten.append(user_key)


async def test_core_handlers_through_the_real_adapter(fake_telegram: FakeTelegram, tmp_path: Path) -> None:
    from bot.storage import Storage
    from handlers.messages import t
    from handlers.services import Services

    settings = fake_telegram.bot_settings(data_dir=tmp_path / "data")
    jobs = _NoJobs()
    async with Storage(settings.db_path) as storage:
        adapters: dict[str, TelegramAdapter] = {}
        services = Services.build(settings, storage, channel_for=lambda chat: adapters[chat.platform].channel_for(chat),
                                  jobs=jobs)  # type: ignore[arg-type]
        adapter = adapters["telegram"] = TelegramAdapter(settings, services)
        async with adapter:
            fake_telegram.send_message(21, None, "/start")
            start = await fake_telegram.wait_for("sendMessage")
            mark = fake_telegram.mark()
            fake_telegram.send_message(21, None, "/delete")
            question = await fake_telegram.wait_for("sendMessage", since=mark)
            yes = question.params["reply_markup"]["inline_keyboard"][0][0]["callback_data"]
            fake_telegram.press_button(question.result, yes, user=FakeUser(22))  # not theirs
            refused = await fake_telegram.wait_for("answerCallbackQuery")
            fake_telegram.press_button(question.result, yes)
            done = await fake_telegram.wait_for("editMessageText")
            await fake_telegram.wait_idle()
        assert await storage.user_language("telegram:21") is None
    assert "Privacy" in start.params["text"] and start.params["chat_id"] == 21
    assert refused.params["text"] == t("button.not_yours", "en") and refused.params["show_alert"] is True
    assert done.params["text"] == t("delete.done", "en") and jobs.forgotten == ["telegram:21"]
    answers = fake_telegram.calls_of("answerCallbackQuery")
    assert len(answers) == 2 and answers[1].params["text"] == t("delete.working", "en")


async def test_an_unreachable_bot_api_at_start_is_waited_out(fake_telegram: FakeTelegram,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    """A Bot API that answers 502 (PTB's NetworkError, as for DNS or connection errors) is tried again with
    a line a try, then the adapter starts (a refused token still ends the start at once: the InvalidToken test)."""
    fake_telegram.error_next("getMe", times=2, status=502, description="Bad Gateway")
    caplog.set_level(logging.WARNING, logger="bot.platforms.telegram_adapter")
    async with adapter_for(fake_telegram, Recorder(None)) as adapter:
        assert adapter.bot.username  # getMe answered on the third try
    tries = [r for r in caplog.records if "cannot reach the Bot API" in r.getMessage()]
    assert len(tries) == 2 and all(r.exc_info is None for r in tries)
