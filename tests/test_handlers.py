"""The platform-neutral handlers with a fake reply channel, a fake job queue and a real Storage."""
from __future__ import annotations

import asyncio
import io
import itertools
import logging
import sqlite3
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from bot.config import Settings
from bot.storage import USER_TABLES, Artifact, Storage, new_artifact_id
from facechain_core.errors import UserFacingError
from facechain_core.faces import create_detector
from handlers import buttons, progress, router
from handlers.messages import t
from handlers.protocols import (
    Attachment,
    Button,
    Chat,
    Event,
    JobView,
    Media,
    MessageRef,
    SentFile,
    Submitted,
    User,
    Visibility,
)
from handlers.selfie import build_selfie_checker
from handlers.services import Services

pytestmark = pytest.mark.timeout(60)


# -- fakes ---------------------------------------------------------------------------------------
@dataclass
class FakeChannel:
    """Records what handlers send; refs count up per channel."""

    chat: Chat
    texts: list[tuple[str, list[list[Button]] | None, Visibility]] = field(default_factory=list)
    edits: list[tuple[MessageRef, str, list[list[Button]] | None]] = field(default_factory=list)
    albums: list[tuple[list[Media], str | None, list[list[Button]] | None]] = field(default_factory=list)
    answers: list[tuple[str | None, bool]] = field(default_factory=list)
    deleted: list[MessageRef] = field(default_factory=list)
    _ids: Any = field(default_factory=lambda: itertools.count(500))

    def _ref(self) -> MessageRef:
        return MessageRef(self.chat, str(next(self._ids)))

    async def send_text(self, text: str, buttons: list[list[Button]] | None = None,
                        visibility: Visibility = Visibility.CHAT) -> MessageRef:
        self.texts.append((text, buttons, visibility))
        return self._ref()

    async def edit_text(self, ref: MessageRef, text: str, buttons: list[list[Button]] | None = None) -> None:
        self.edits.append((ref, text, buttons))

    async def delete_message(self, ref: MessageRef) -> None:
        self.deleted.append(ref)

    async def send_images(self, images: list[Media], caption: str | None = None,
                          buttons: list[list[Button]] | None = None,
                          visibility: Visibility = Visibility.CHAT) -> list[SentFile]:
        self.albums.append((images, caption, buttons))
        return [SentFile(self._ref(), f"tg-file-{len(self.albums)}-{i}") for i in range(len(images))]

    async def send_video(self, video: Media, caption: str | None = None,
                         buttons: list[list[Button]] | None = None) -> SentFile:
        return SentFile(self._ref(), "video-id")

    async def send_video_note(self, video: Media) -> SentFile:
        return SentFile(self._ref(), "note-id")

    async def send_audio(self, audio: Media, caption: str | None = None, voice: bool = False) -> SentFile:
        return SentFile(self._ref(), "audio-id")

    async def send_document(self, document: Media, caption: str | None = None) -> SentFile:
        return SentFile(self._ref(), "doc-id")

    async def answer_button(self, text: str | None = None, alert: bool = False) -> None:
        self.answers.append((text, alert))

    @property
    def said(self) -> list[str]:
        return [text for text, _, _ in self.texts]


class FakeJobQueue:
    """Writes job rows like the scheduler does; positions and ETAs are set by the test."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self.submitted: list[tuple[str, str, dict[str, Any], Chat]] = []
        self.progress_refs: dict[int, MessageRef] = {}
        self.cancel_calls: list[tuple[str, int | None]] = []
        self.forgotten: list[str] = []
        self.views: dict[int, JobView] = {}

    async def submit(self, user_key: str, kind: str, params: dict[str, Any], chat: Chat,
                     progress_ref: MessageRef | None = None) -> Submitted:
        job = await self.storage.insert_job(user_key, kind, 1, params, chat.to_dict(), 2)
        self.submitted.append((user_key, kind, params, chat))
        position = sum(1 for v in self.views.values() if v.state == "queued") + 1
        self.views[job.id] = JobView(job.id, kind, "queued", position, 30.0 * position, None)
        return Submitted(job.id, position, 30.0 * position)

    async def attach_progress(self, job_id: int, ref: MessageRef) -> None:
        self.progress_refs[job_id] = ref
        await self.storage.set_progress_ref(job_id, ref.to_dict())

    async def cancel(self, user_key: str, job_id: int | None = None) -> list[int]:
        self.cancel_calls.append((user_key, job_id))
        done = []
        for job in await self.storage.user_jobs(user_key, ("queued", "running")):
            if job_id is None or job.id == job_id:
                await self.storage.end_job(job.id, "cancelled")
                self.views.pop(job.id, None)
                done.append(job.id)
        return done

    async def user_jobs(self, user_key: str) -> list[JobView]:
        rows = await self.storage.user_jobs(user_key, ("queued", "running"))
        return [self.views[r.id] for r in rows if r.id in self.views]

    async def forget_user(self, user_key: str) -> None:
        self.forgotten.append(user_key)
        await self.cancel(user_key)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class World:
    services: Services
    storage: Storage
    jobs: FakeJobQueue
    clock: Clock
    channels: dict[str, FakeChannel]
    data_dir: Path

    def channel(self, chat: Chat) -> FakeChannel:
        if chat.key not in self.channels:
            self.channels[chat.key] = FakeChannel(chat)
        return self.channels[chat.key]

    async def send(self, event: Event) -> FakeChannel:
        channel = self.channel(event.chat)
        await router.handle_event(self.services, event, channel)
        return channel


def private(user_id: int = 1) -> Chat:
    return Chat("telegram", str(user_id), True)


def group(chat_id: int = -100) -> Chat:
    return Chat("telegram", str(chat_id), False, "Family")


def make_event(user_id: int = 1, chat: Chat | None = None, *, text: str = "", attachments: list[Attachment] | None = None,
               button: str | None = None, message_id: str | None = None, lang: str = "en") -> Event:
    command, args = None, []
    if text.startswith("/"):
        head, *args = text.split()
        command = head[1:]
    return Event(user=User("telegram", str(user_id), "Ann", lang), chat=chat or private(user_id), text=text,
                 command=command, args=args, attachments=attachments or [], message_id=message_id,
                 button_payload=button, language=lang)


def attachment(data: bytes, kind: str = "photo", mime: str | None = "image/jpeg", filename: str | None = None,
               size: int | None = None) -> tuple[Attachment, list[int]]:
    fetched: list[int] = []

    async def fetch() -> bytes:
        fetched.append(1)
        return data

    return Attachment(kind, len(data) if size is None else size, mime, filename, fetch), fetched


def refuse_selfie(data: bytes) -> Any:
    raise AssertionError("the selfie check must not run in this test")


async def _world(root: Path, check: Callable[[bytes], Any] = refuse_selfie, **config: Any) -> World:
    settings = Settings.model_validate({"data_dir": str(root / "data"), **config})
    storage = Storage(root / "data" / "db.sqlite3")
    await storage.open()
    jobs = FakeJobQueue(storage)
    clock = Clock()
    channels: dict[str, FakeChannel] = {}
    services = Services(settings=settings, storage=storage, jobs=jobs, data_dir=settings.data_dir,
                        check_selfie=check, channel_for=lambda chat: w.channel(chat), clock=clock)
    w = World(services, storage, jobs, clock, channels, settings.data_dir)
    return w


@pytest.fixture
async def make_world(tmp_path: Path) -> Any:
    """Builds worlds (each with its own data dir) and closes their storage after the test."""
    made: list[World] = []

    async def make(check: Callable[[bytes], Any] = refuse_selfie, **config: Any) -> World:
        made.append(await _world(tmp_path / f"w{len(made)}", check, **config))
        return made[-1]

    yield make
    for w in made:
        await w.storage.close()


@pytest.fixture
async def world(make_world: Callable[..., Awaitable[World]]) -> World:
    return await make_world()


# -- /start, /help, unknown input ----------------------------------------------------------------
async def test_start_explains_how_to_begin_and_privacy(world: World) -> None:
    channel = await world.send(make_event(text="/start"))
    (text,) = channel.said
    assert "Ann" in text and "selfie" in text and "/delete" in text and "Privacy" in text
    zh = await world.send(make_event(2, text="/start", lang="zh"))
    assert "隐私" in zh.said[0]


async def test_help_lists_commands_and_hides_admin_ones(make_world: Any) -> None:
    async def secret(services: Services, event: Event, channel: Any) -> None:
        await channel.send_text("secret ran")

    router.register_command("zz_admin", secret, "help.help", admin_only=True)
    try:
        w = await make_world(access={"admins": ["telegram:9"]})
        text = (await w.send(make_event(text="/help"))).said[0]
        for name in ("start", "help", "status", "cancel", "delete"):
            assert f"/{name} — " in text
        assert "/zz_admin" not in text
        assert "/zz_admin" in (await w.send(make_event(9, text="/help"))).said[0]
        assert (await w.send(make_event(text="/zz_admin"))).said[-1] == t("core.admin_only", "en")
        assert (await w.send(make_event(9, text="/zz_admin"))).said[-1] == "secret ran"
        assert "zz_admin" not in [name for name, _ in router.command_menu("en")]
    finally:
        router._commands.pop("zz_admin", None)


async def test_unknown_commands_and_plain_text(world: World) -> None:
    channel = await world.send(make_event(text="/frobnicate"))
    assert channel.said == [t("core.unknown_command", "en", command="frobnicate")]
    await world.send(make_event(text="hello there"))
    assert channel.said[-1] == t("core.text_hint", "en")
    in_group = await world.send(make_event(chat=group(), text="/frobnicate"))
    await world.send(make_event(chat=group(), text="just chatting"))
    assert in_group.said == []


# -- /status -------------------------------------------------------------------------------------
async def test_status_shows_jobs_selfies_and_likeness(world: World) -> None:
    key = "telegram:1"
    await world.storage.ensure_user(key, "telegram", "en")
    for i in range(2):
        await world.storage.add_selfie(key, f"/x/{i}.jpg", {"box": [0, 0, 1, 1]})
    first = await world.jobs.submit(key, "identity", {}, private())
    second = await world.jobs.submit(key, "demo", {}, private())
    world.jobs.views[first.job_id] = JobView(first.job_id, "identity", "running", 0, 20.0, 0.4)
    text = (await world.send(make_event(text="/status"))).said[-1]
    assert f"#{first.job_id} likeness: running, 40% done" in text
    assert f"#{second.job_id} demo: waiting, position 2" in text and "about 1 min left" in text
    assert "Selfies: 2 of 10." in text and "being learned" in text

    world.jobs.views[second.job_id] = JobView(second.job_id, "demo", "done", None, None, 1.0)
    text = (await world.send(make_event(text="/status"))).said[-1]
    assert f"#{second.job_id} demo: done, sending it to you" in text

    await world.jobs.cancel(key)
    await world.storage.set_identity(key, "/x/identity.npz", 2)
    text = (await world.send(make_event(text="/status"))).said[-1]
    assert t("status.no_jobs", "en") in text and "ready (learned from 2 photos)" in text
    fresh = (await world.send(make_event(5, text="/status"))).said[-1]
    assert "Selfies: 0 of 10." in fresh and "not learned yet" in fresh


# -- /cancel -------------------------------------------------------------------------------------
async def test_cancel_command_cancels_jobs_and_pending_input(world: World) -> None:
    key = "telegram:1"
    for kind in ("demo", "demo"):
        await world.jobs.submit(key, kind, {}, private())
    await world.jobs.submit("telegram:2", "demo", {}, private(2))
    channel = await world.send(make_event(text="/cancel"))
    assert channel.said == [t("cancel.done", "en", count=2)]
    assert world.jobs.cancel_calls == [(key, None)]
    assert len(await world.storage.user_jobs("telegram:2", ("queued",))) == 1
    await world.storage.set_pending(key, private().key, "tryon", {}, 60)
    await world.send(make_event(text="/cancel"))
    assert channel.said[-1] == t("cancel.pending_dropped", "en")
    assert await world.storage.take_pending(key, private().key) is None
    await world.send(make_event(text="/cancel"))
    assert channel.said[-1] == t("cancel.nothing", "en")


async def test_cancel_button_checks_the_presser(world: World) -> None:
    owner, chat = "telegram:1", group()
    await world.storage.ensure_user(owner, "telegram", "en")
    submitted = await progress.submit_with_progress(world.services, make_event(chat=chat, text="/style"),
                                                    world.channel(chat), "demo", {"style": "x"})
    channel = world.channel(chat)
    text, keyboard, _ = channel.texts[-1]
    assert "position 1" in text
    assert keyboard == [[Button("Cancel", f"cancel:{submitted.job_id}")]]
    assert world.jobs.progress_refs[submitted.job_id].chat == chat

    payload = keyboard[0][0].payload
    await world.send(make_event(2, chat, button=payload))
    assert channel.answers[-1] == (t("button.not_yours", "en"), True)
    assert (await world.storage.job(submitted.job_id)).state == "queued"
    await world.send(make_event(1, chat, button=payload))
    assert channel.answers[-1] == (t("button.cancelling", "en"), False)
    assert (await world.storage.job(submitted.job_id)).state == "cancelled"
    await world.send(make_event(1, chat, button=payload))
    assert channel.answers[-1] == (t("button.job_over", "en"), False)
    await world.send(make_event(1, chat, button="cancel:999999"))
    assert channel.answers[-1] == (t("button.stale", "en"), False)
    assert len(channel.answers) == 4  # each press answered exactly once


# -- /delete -------------------------------------------------------------------------------------
async def _user_rows(db_path: Path, key: str) -> dict[str, int]:
    with sqlite3.connect(db_path) as db:
        return {table: db.execute(f"SELECT COUNT(*) FROM {table} WHERE {column} = ?", (key,)).fetchone()[0]
                for table, column in USER_TABLES.items()}


async def test_delete_confirms_then_leaves_nothing(world: World) -> None:
    key, other = "telegram:1", "telegram:2"
    for user in (key, other):
        await world.storage.ensure_user(user, "telegram", "en")
        folder = world.services.user_dir(user)
        (folder / "selfies").mkdir(parents=True)
        (folder / "selfies" / "a.jpg").write_bytes(b"jpeg")
        await world.storage.add_selfie(user, str(folder / "selfies" / "a.jpg"), {})
        await world.storage.set_identity(user, str(folder / "identity.npz"), 1)
        await world.storage.add_artifact(Artifact(new_artifact_id(), None, user, "demo", str(folder / "r.png"),
                                                  "image/png"))
        await world.jobs.submit(user, "demo", {}, private())
        await world.storage.set_pending(user, private().key, "tryon", {}, 60)
        await world.storage.open_panel(user, private().key, "studio", {"style_id": "hanfu"}, 60)
        await world.storage.take_chat_quota("telegram:-1", user, "2099-01-01", 5)
        artifact = Artifact(new_artifact_id(), None, user, "demo", str(folder / "s.png"), "image/png")
        await world.storage.add_artifact(artifact)
        await world.storage.add_report(artifact.id, user, user, "telegram:-1")
        # Duo: a request the user made and one they were asked in, a block, a group portrait they are in.
        third, group = "telegram:3", {"platform": "telegram", "id": "-1", "is_private": False}
        await world.storage.open_duo_request(f"r{user[-1]}", user, group, {}, [third], 60)
        await world.storage.open_duo_request(f"q{user[-1]}", third, group, {}, [user], 60)
        await world.storage.block_duo(user, third)
        job = await world.storage.insert_job(third, "duo", 0, {"owners": [third, user]}, group, 1)
        await world.storage.finish_job(job.id, {}, [Artifact(new_artifact_id(), job.id, third, "duo",
                                                             str(world.services.user_dir(third) / f"{user}.png"),
                                                             "image/png")])
    assert all((await _user_rows(world.storage.path, key)).values())

    channel = await world.send(make_event(text="/delete"))
    text, keyboard, _ = channel.texts[-1]
    assert text == t("delete.confirm", "en")
    yes, no = keyboard[0]
    assert yes.payload.startswith("delete:") and no.payload.startswith("keep:")
    await world.send(make_event(2, private(1), button=yes.payload, message_id="500"))
    assert channel.answers[-1] == (t("button.not_yours", "en"), True)
    assert world.services.user_dir(key).exists()

    await world.send(make_event(1, button=yes.payload, message_id="500"))
    assert world.jobs.forgotten == [key]
    assert not world.services.user_dir(key).exists()
    assert set((await _user_rows(world.storage.path, key)).values()) == {0}
    assert channel.edits[-1] == (MessageRef(private(1), "500"), t("delete.done", "en"), None)
    # Someone else's data is untouched.
    assert world.services.user_dir(other).exists() and all((await _user_rows(world.storage.path, other)).values())
    # The question cannot be answered twice.
    await world.send(make_event(1, button=yes.payload, message_id="500"))
    assert channel.answers[-1] == (t("delete.expired", "en"), True)


async def test_delete_keep_and_expiry(world: World) -> None:
    channel = await world.send(make_event(text="/delete"))
    yes, no = channel.texts[-1][1][0]
    await world.send(make_event(button=no.payload, message_id="7"))
    assert channel.edits[-1][1] == t("delete.kept", "en")
    await world.send(make_event(text="/delete"))
    yes, _ = channel.texts[-1][1][0]
    world.clock.now += 601
    await world.send(make_event(button=yes.payload, message_id="8"))
    assert channel.answers[-1] == (t("delete.expired", "en"), True)
    assert world.jobs.forgotten == []


# -- selfie intake -------------------------------------------------------------------------------
@pytest.fixture
async def selfie_world(make_world: Any, yunet_path: Path) -> World:
    detector = create_detector("yunet", yunet_path)
    check = build_selfie_checker(detector, min_face_px=64, max_upload_mb=20, max_pixels=50_000_000)
    return await make_world(check, limits={"max_selfies": 2})


async def test_selfie_accepted_and_stored(selfie_world: World, faces_dir: Path) -> None:
    w = selfie_world
    data = (faces_dir / "obama.jpg").read_bytes()
    photo, fetched = attachment(data)
    channel = await w.send(make_event(attachments=[photo]))
    (said,) = channel.said
    assert said.startswith(t("intake.accepted", "en", count=1, max=2)) and "/privacy" in said  # consent note
    (row,) = await w.storage.selfies("telegram:1")
    path = Path(row.path)
    assert path.parent == (w.services.user_dir("telegram:1") / "selfies").resolve() and path.suffix == ".jpg"
    with Image.open(path) as stored, Image.open(io.BytesIO(data)) as original:
        assert stored.format == "JPEG" and stored.size == original.size
    assert len(row.face["box"]) == 4 and row.face["faces_found"] == 1
    assert fetched == [1] and w.jobs.submitted == []  # no portrait feature: no identity job


async def test_selfies_keep_the_newest_and_queue_one_identity_job(selfie_world: World, faces_dir: Path) -> None:
    w = selfie_world
    w.services.features_installed.add("portrait")
    for name in ("obama.jpg", "obama2.jpg", "obama3.jpg"):
        photo, _ = attachment((faces_dir / name).read_bytes(), kind="document", filename=name)
        channel = await w.send(make_event(attachments=[photo]))
    assert channel.said[-1] == t("intake.learning", "en", count=2)
    rows = await w.storage.selfies("telegram:1")
    files = sorted((w.services.user_dir("telegram:1") / "selfies").iterdir())
    assert len(rows) == 2 and sorted(Path(r.path) for r in rows) == [f.resolve() for f in files]
    # Each new selfie replaced the identity job still waiting in the queue.
    assert [kind for _, kind, _, _ in w.jobs.submitted] == ["identity"] * 3
    queued = await w.storage.user_jobs("telegram:1", ("queued",))
    assert len(queued) == 1
    params = queued[0].params
    assert [s["path"] for s in params["selfies"]] == [r.path for r in rows]
    assert params["out"].endswith("telegram:1/identity.npz") and all("box" in s["face"] for s in params["selfies"])


async def test_selfie_rejections_say_why(selfie_world: World, faces_dir: Path) -> None:
    w = selfie_world
    two, _ = attachment((faces_dir / "two_people.jpg").read_bytes())
    channel = await w.send(make_event(attachments=[two]))
    assert channel.said[-1].startswith("I found 2 faces")
    text_file, fetched = attachment(b"just some notes\n", kind="document", mime="text/plain", filename="notes.txt")
    await w.send(make_event(attachments=[text_file]))
    assert channel.said[-1] == t("image.not_image", "en") and fetched == []
    huge, fetched = attachment(b"x", size=25_000_000)
    await w.send(make_event(attachments=[huge]))
    assert channel.said[-1] == t("image.too_large", "en", size_mb="25.0", max_mb="20.0") and fetched == []
    voice, _ = attachment(b"OggS", kind="voice", mime="audio/ogg")
    await w.send(make_event(attachments=[voice]))
    assert channel.said[-1] == t("core.unexpected_file", "en")
    assert await w.storage.selfies("telegram:1") == []
    assert not w.services.user_dir("telegram:1").exists()


async def test_a_missing_detector_is_reported_not_crashed(tmp_path: Path) -> None:
    settings = Settings.model_validate({"data_dir": str(tmp_path / "data"), "models_dir": str(tmp_path / "none")})
    async with Storage(settings.db_path) as storage:
        services = Services.build(settings, storage, channel_for=lambda chat: FakeChannel(chat))
        channel = FakeChannel(private())
        photo, fetched = attachment(b"any bytes")
        await router.handle_event(services, make_event(attachments=[photo]), channel)
        assert channel.said == [t("model.not_installed", "en", model="yunet_s_640_640.onnx", feature="selfie",
                                  pull_command="facechain-bot models pull selfie")]
        with pytest.raises(RuntimeError, match="scheduler"):
            await services.jobs.user_jobs("telegram:1")


async def test_group_photo_is_not_downloaded_nor_stored(selfie_world: World, faces_dir: Path) -> None:
    w = selfie_world
    photo, fetched = attachment((faces_dir / "obama.jpg").read_bytes())
    channel = await w.send(make_event(chat=group(), attachments=[photo]))
    assert channel.said == [t("intake.group", "en", name="Ann")]
    await w.send(make_event(chat=group(), attachments=[photo]))
    assert len(channel.said) == 1  # reminded once, not per photo
    assert fetched == [] and await w.storage.selfies("telegram:1") == []
    assert await w.storage.user_language("telegram:1") is None  # no row about the sender either


# -- pending input -------------------------------------------------------------------------------
async def test_pending_input_routes_the_next_file(world: World) -> None:
    received: list[tuple[str, dict[str, Any]]] = []

    async def ask_outfit(services: Services, event: Event, channel: Any) -> None:
        await router.expect_input(services, event, "zz_outfit", {"style": event.args[0]})
        await channel.send_text("send the outfit")

    async def got_outfit(services: Services, event: Event, channel: Any, pending: Any) -> None:
        received.append((event.attachments[0].kind, pending.payload))
        await channel.send_text("outfit received")

    router.register_command("zz_outfit", ask_outfit, "help.help")
    router.register_pending("zz_outfit", got_outfit)
    world.services.check_selfie = lambda data: (_ for _ in ()).throw(UserFacingError("selfie.no_face"))
    try:
        channel = await world.send(make_event(text="/zz_outfit red"))
        # A file in another chat is not the one awaited.
        other, _ = attachment(b"img")
        await world.send(make_event(chat=group(), attachments=[other]))
        assert received == []
        photo, _ = attachment(b"img")
        await world.send(make_event(attachments=[photo]))
        assert received == [("photo", {"style": "red"})] and channel.said[-1] == "outfit received"
        # Taken once: the next photo is a selfie again.
        await world.send(make_event(attachments=[photo]))
        assert channel.said[-1] == t("selfie.no_face", "en")
    finally:
        router._commands.pop("zz_outfit", None)
        router._pending_handlers.pop("zz_outfit", None)


async def test_expired_pending_input_falls_back_to_selfie(make_world: Any) -> None:
    async def got(services: Services, event: Event, channel: Any, pending: Any) -> None:
        raise AssertionError("expired input must not be routed")

    router.register_pending("zz_late", got)
    w = await make_world(lambda data: (_ for _ in ()).throw(UserFacingError("selfie.no_face")),
                     limits={"pending_input_ttl_s": 0.001})
    try:
        await router.expect_input(w.services, make_event(), "zz_late")
        await asyncio.sleep(0.01)
        photo, _ = attachment(b"img")
        channel = await w.send(make_event(attachments=[photo]))
        assert channel.said == [t("selfie.no_face", "en")]
    finally:
        router._pending_handlers.pop("zz_late", None)


# -- result buttons ------------------------------------------------------------------------------
async def test_result_buttons_check_the_owner(world: World) -> None:
    pressed: list[tuple[str, str]] = []

    async def more(services: Services, event: Event, channel: Any, artifact: Any) -> None:
        pressed.append((event.user.key, artifact.id))
        await channel.answer_button("on it")

    buttons.register_result_button("zzmore", "cancel.button", more, applies_to={"demo"})
    try:
        mine = Artifact(new_artifact_id(), None, "telegram:1", "demo", "/x.png", "image/png")
        cartoon = Artifact(new_artifact_id(), None, "telegram:1", "other", "/y.png", "image/png")
        for a in (mine, cartoon):
            await world.storage.add_artifact(a)
        assert [b.payload for b in buttons.result_buttons("demo", mine.id, "en")] == [f"zzmore:{mine.id}"]
        assert buttons.result_buttons("other", cartoon.id, "en") == []
        chat = group()
        channel = world.channel(chat)
        await world.send(make_event(2, chat, button=f"zzmore:{mine.id}"))
        assert channel.answers == [(t("button.not_yours", "en"), True)] and pressed == []
        await world.send(make_event(1, chat, button=f"zzmore:{mine.id}"))
        assert pressed == [("telegram:1", mine.id)] and channel.answers[-1] == ("on it", False)
        for stale in (f"zzmore:{cartoon.id}", "zzmore:nonexistent", "nope:1", "garbage", "zzmore:"):
            before = len(channel.answers)
            await world.send(make_event(1, chat, button=stale))
            assert channel.answers[before:] == [(t("button.stale", "en"), False)], stale
        with pytest.raises(ValueError):
            buttons.register_result_button("zzmore", "cancel.button", more)
    finally:
        buttons.unregister_button("zzmore")


# -- rate limit, access control, failures --------------------------------------------------------
async def test_rate_limit_per_user(make_world: Any) -> None:
    w = await make_world(limits={"commands_per_minute": 3})
    channel = w.channel(private(1))
    for _ in range(5):
        await w.send(make_event(text="/help"))
    assert len(channel.said) == 4 and channel.said[-1] == t("core.rate_limited", "en")
    other = await w.send(make_event(2, text="/help"))
    assert other.said[-1].startswith(t("core.help_header", "en"))
    w.clock.now += 61
    await w.send(make_event(text="/help"))
    assert channel.said[-1].startswith(t("core.help_header", "en"))


async def test_access_control_by_user_and_chat(make_world: Any) -> None:
    w = await make_world(access={"allowed_users": ["telegram:1"]})
    assert (await w.send(make_event(2, text="/start"))).said == [t("core.access_denied", "en")]
    assert "Privacy" in (await w.send(make_event(1, text="/start"))).said[0]
    assert await w.storage.user_language("telegram:2") is None  # nothing stored for a stranger

    w = await make_world(access={"allowed_chats": ["telegram:-100"]})
    assert "/status" in (await w.send(make_event(1, group(-100), text="/help"))).said[0]
    refused = await w.send(make_event(1, group(-200), text="/help"))
    assert refused.said == [t("core.chat_denied", "en")]
    photo, fetched = attachment(b"img")
    await w.send(make_event(1, group(-200), attachments=[photo]))
    assert refused.said == [t("core.chat_denied", "en")] and fetched == []  # a stray photo: no reply
    await w.send(make_event(1, group(-200), button="cancel:1"))
    assert refused.answers == [(t("core.chat_denied", "en"), True)]


async def test_failures_never_escape(world: World, caplog: pytest.LogCaptureFixture) -> None:
    async def broken(services: Services, event: Event, channel: Any) -> None:
        raise RuntimeError("disk on fire")

    async def expected(services: Services, event: Event, channel: Any) -> None:
        raise UserFacingError("image.corrupt")

    async def broken_button(services: Services, event: Event, channel: Any, argument: str) -> None:
        raise KeyError(argument)

    router.register_command("zz_broken", broken, "help.help")
    router.register_command("zz_expected", expected, "help.help")
    buttons.register_core_button("zzboom", broken_button)
    try:
        caplog.set_level(logging.ERROR, logger="handlers.router")
        channel = await world.send(make_event(text="/zz_broken"))
        assert channel.said == [t("core.error", "en")]
        (record,) = [r for r in caplog.records if r.name == "handlers.router"]
        assert record.exc_info and "disk on fire" in caplog.text
        await world.send(make_event(text="/zz_expected", lang="zh"))
        assert channel.said[-1] == t("image.corrupt", "zh")
        await world.send(make_event(button="zzboom:1"))
        assert channel.answers == [(t("core.error", "en"), True)]
    finally:
        router._commands.pop("zz_broken", None)
        router._commands.pop("zz_expected", None)
        buttons.unregister_button("zzboom")


# -- progress and delivery -----------------------------------------------------------------------
async def test_progress_is_one_message_throttled_with_final_state(world: World) -> None:
    key, chat = "telegram:1", private()
    await world.storage.ensure_user(key, "telegram", "en")
    submitted = await world.jobs.submit(key, "demo", {}, chat)
    job = await world.storage.job(submitted.job_id)
    channel = world.channel(chat)
    services = world.services
    await progress.show_progress(services, job, 1, 10)
    (first, keyboard, _), = channel.texts
    assert "10%" in first and keyboard == [[Button("Cancel", f"cancel:{job.id}")]]
    assert world.jobs.progress_refs[job.id] == MessageRef(chat, "500")
    world.clock.now += 0.5
    await progress.show_progress(services, job, 2, 10)
    assert channel.edits == []  # within the 2 s interval
    world.clock.now += 2.0
    await progress.show_progress(services, job, 6, 10)
    ref, text, keyboard = channel.edits[-1]
    assert ref == MessageRef(chat, "500") and "60%" in text and "about 2 s left" in text and keyboard
    world.clock.now += 0.1
    await progress.show_progress(services, job, 10, 10)
    assert "100%" in channel.edits[-1][1] and channel.edits[-1][2] is None  # final: shown at once, no Cancel
    assert len(channel.texts) == 1  # always the same message


async def test_deliver_result_sends_an_album_once_with_buttons(world: World, tmp_path: Path) -> None:
    async def noop(services: Services, event: Event, channel: Any, artifact: Any) -> None:
        return None

    buttons.register_result_button("zzagain", "cancel.button", noop, applies_to={"demo"})
    try:
        key, chat = "telegram:1", private()
        await world.storage.ensure_user(key, "telegram", "en")
        submitted = await world.jobs.submit(key, "demo", {}, chat)
        await world.jobs.attach_progress(submitted.job_id, MessageRef(chat, "42"))
        arts = [Artifact(new_artifact_id(), submitted.job_id, key, "demo", str(tmp_path / f"{i}.png"), "image/png")
                for i in range(2)]
        await world.storage.finish_job(submitted.job_id, {}, arts)
        job = await world.storage.job(submitted.job_id)
        await progress.deliver_result(world.services, job, await world.storage.job_artifacts(job.id))
        channel = world.channel(chat)
        (media, caption, keyboard), = channel.albums
        assert [m.path for m in media] == [Path(a.path) for a in arts] and caption.startswith(t("result.caption", "en"))
        assert "AI-generated" in caption
        payloads = [b.payload for row in keyboard for b in row]
        assert [p for p in payloads if p.startswith("zzagain:")] == [f"zzagain:{a.id}" for a in arts]
        assert [p for p in payloads if p.startswith("report:")] == [f"report:{a.id}" for a in arts]
        assert [b.label for row in keyboard for b in row if b.payload.startswith("zzagain:")] == ["Cancel 1", "Cancel 2"]
        stored = await world.storage.job_artifacts(job.id)
        assert [a.file_ids for a in stored] == [{"telegram": "tg-file-1-0"}, {"telegram": "tg-file-1-1"}]
        assert all(a.delivered_at for a in stored)
        assert channel.edits[-1] == (MessageRef(chat, "42"), t("progress.done", "en"), None)
        await progress.deliver_result(world.services, job, stored)
        assert len(channel.albums) == 1  # delivered artifacts are not sent again
    finally:
        buttons.unregister_button("zzagain")


async def test_failure_and_cancellation_reports(world: World) -> None:
    key, chat = "telegram:1", private()
    await world.storage.ensure_user(key, "telegram", "zh")
    submitted = await world.jobs.submit(key, "demo", {}, chat)
    job = await world.storage.job(submitted.job_id)
    channel = world.channel(chat)
    await progress.report_failure(world.services, job, {"code": "selfie.no_face", "details": {}})
    assert channel.said == [t("selfie.no_face", "zh")]  # no progress message yet: a new one
    await world.jobs.attach_progress(job.id, MessageRef(chat, "77"))
    job = await world.storage.job(job.id)
    await progress.report_failure(world.services, job, RuntimeError("secret internals"))
    assert channel.edits[-1] == (MessageRef(chat, "77"), t("job.failed", "zh"), None)
    await progress.report_failure(world.services, job, {"code": "no.such.code"})
    assert channel.edits[-1][1] == t("job.failed", "zh")
    await progress.report_cancelled(world.services, job)
    assert channel.edits[-1] == (MessageRef(chat, "77"), t("progress.cancelled", "zh"), None)


# -- duo requests across a restart ---------------------------------------------------------------
async def test_duo_requests_left_waiting_expire_after_a_restart(world: World) -> None:
    from handlers import duo

    chat = group()
    await world.storage.open_duo_request("gone", "telegram:1", chat.to_dict(), {"language": "en"}, ["telegram:2"], 0.01)
    await world.storage.open_duo_request("open", "telegram:3", chat.to_dict(), {"language": "en"}, ["telegram:4"], 60)
    await asyncio.sleep(0.05)
    await duo.resume_timers(world.services)  # what the service does on start
    await asyncio.sleep(0.1)
    assert (await world.storage.duo_request("gone")).state == "expired"
    assert world.channel(chat).texts[-1][0] == t("duo.expired", "en")
    assert (await world.storage.duo_request("open")).state == "waiting"
    assert len(world.services.runtime.tasks) == 1  # the open request's clock runs on
    for task in list(world.services.runtime.tasks):
        task.cancel()


async def test_help_explains_duo_and_group(world: World) -> None:
    import handlers.features  # noqa: F401  (every command registered, as in the service)

    for user_id, lang in ((11, "en"), (12, "zh")):
        text = (await world.send(make_event(user_id, text="/help", lang=lang))).said[-1]
        assert t("help.duo", lang) in text and t("help.group", lang) in text


async def test_a_command_whose_models_are_missing_refuses_and_logs_the_pull(
        world: World, caplog: pytest.LogCaptureFixture) -> None:
    import handlers.features  # noqa: F401  (every command registered, as in the service)

    for user_id, (command, feature) in enumerate((("/tryon", "tryon"), ("/template", "template"),
                                                  ("/cartoon", "cartoon")), start=21):
        for lang in ("en", "zh"):
            with caplog.at_level(logging.WARNING, logger="handlers.services"):
                said = (await world.send(make_event(user_id, text=command, lang=lang))).said[-1]
            assert said == t("feature.not_installed", lang, feature=feature)
            assert f"run `facechain-bot models pull {feature}`" in caplog.text
            caplog.clear()
    assert world.jobs.submitted == []
