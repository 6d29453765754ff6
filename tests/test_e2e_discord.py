"""The whole service (storage, scheduler, worker process, handlers, real discord.py client) against
the fake Discord REST + gateway server. Every check reads the HTTP requests the fake received."""
from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bot.app import open_service
from bot.engine.jobkinds import GENERATE, INTERACTIVE, JobKind
from bot.ops.logsetup import configure_logging
from facechain_core.devtools import SleepPipeline
from facechain_core.pipeline import JobResult, Progress
from facechain_core.tiny.cartoon import build_cartoon_models
from handlers import buttons, router
from handlers.messages import t
from handlers.progress import submit_with_progress
from handlers.protocols import Event, ReplyChannel
from handlers.services import Services
from bot.config import Settings
from tests.fixtures.fake_discord import (
    APP_ID,
    EPHEMERAL,
    INTERACTION_DEADLINE_S,
    TOKEN,
    ApiRequest,
    FakeDiscord,
    FakeInteraction,
)
from tests.fixtures.fake_discord import fake_discord  # noqa: F401
from tests.fixtures.fake_telegram import FakeTelegram
from tests.fixtures.privacy import user_traces

pytestmark = pytest.mark.timeout(90)

USER = 412345678901234567
OTHER = 498765432109876543
WEBHOOK = rf"/webhooks/{APP_ID}/[^/]+"
SLEEP_KIND = JobKind("test.sleep", "facechain_core.devtools:SleepPipeline", GENERATE, 2, 60)
# The portrait and identity kinds run test pipelines: the chat side of /style is under test here.
FAKE_PORTRAIT = JobKind("portrait", "tests.test_e2e_discord:PortraitStandIn", GENERATE, 2, 60)
FAKE_IDENTITY = JobKind("identity", "facechain_core.devtools:SleepPipeline", INTERACTIVE, 2, 60)


class PortraitStandIn(SleepPipeline):
    """Stands in for the portrait pipeline (in the worker): progress steps, then one small PNG per portrait."""

    def run(self, params: dict, progress: Progress) -> JobResult:
        """Reports three steps, then writes `count` PNGs of distinct colours."""
        steps = super().run({**params, "steps": 3, "delay_s": 0.05}, progress)
        Path(steps.files[0]).unlink()
        files = []
        for index in range(int(params.get("count", 1))):
            path = Path(params["out_dir"]) / f"portrait_{index}.png"
            Image.new("RGB", (64, 96), (60 * index, 120, 200)).save(path)
            files.append(path)
        return JobResult(files=files, meta=steps.meta)


@pytest.fixture
def settings(fake_discord: FakeDiscord, tmp_path: Path, yunet_path: Path) -> Settings:
    return fake_discord.bot_settings(
        data_dir=tmp_path / "data", models_dir=yunet_path.parent, log_level="DEBUG",
        selfie={"detector_model": yunet_path.name},
        scheduler={"progress_interval_s": 0, "delivery_retry_s": 0.5},
    )


@pytest.fixture
def portrait_ready(monkeypatch: pytest.MonkeyPatch) -> None:
    """Makes the service believe the portrait models are installed."""
    monkeypatch.setattr("bot.app.installed_features", lambda *args, **kwargs: {"selfie", "portrait"})


@pytest.fixture
def render_command() -> Iterator[None]:
    """A test-only /render command that runs a slow test.sleep job through the scheduler."""
    async def render(services: Services, event: Event, channel: ReplyChannel) -> None:
        await submit_with_progress(services, event, channel, "test.sleep",
                                   {"steps": 6, "delay_s": 0.25, "suffix": ".png"})
    router.register_command("render", render, "help.help", in_menu=False)
    yield
    router._commands.pop("render", None)


def plain_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (400, 300), (120, 160, 200)).save(buf, "JPEG")
    return buf.getvalue()


def dm_id(fake: FakeDiscord, user: int = USER) -> str:
    return fake.dm_channel(user)["id"]


async def answer_of(fake: FakeDiscord, interaction: FakeInteraction, since: int = 0, timeout: float = 15.0) -> str:
    """The text that filled the interaction's deferred response."""
    def mine(request: ApiRequest) -> bool:
        return interaction.token in request.path and request.content is not None

    request = await fake.wait_for("PATCH", WEBHOOK + "/messages/@original", mine, timeout, since=since)
    return request.content or ""


async def send_selfie(fake: FakeDiscord, data: bytes) -> str:
    mark = fake.mark()
    interaction = fake.slash(USER, "selfie", photo1=data)
    return await answer_of(fake, interaction, mark)


async def test_selfie_command_and_dm_photos(fake_discord: FakeDiscord, settings: Settings, faces_dir: Path) -> None:
    fake = fake_discord
    configure_logging(settings)
    async with open_service(settings) as service:
        # A real face through /selfie is accepted; so is one sent as a plain DM.
        accepted = await send_selfie(fake, (faces_dir / "obama.jpg").read_bytes())
        assert accepted.startswith(t("intake.accepted", "en", count=1, max=settings.limits.max_selfies))
        assert "/privacy" in accepted  # the consent note comes with the first selfie
        mark = fake.mark()
        fake.dm(USER, "", [((faces_dir / "obama2.jpg").read_bytes(), "me.jpg", "image/jpeg")])
        reply = await fake.wait_for("POST", rf"/channels/{dm_id(fake)}/messages", since=mark, timeout=15)
        assert reply.content == t("intake.accepted", "en", count=2, max=settings.limits.max_selfies)
        # A text file or a photo without a face gets a clear reason, and nothing is kept.
        mark = fake.mark()
        notes = fake.slash(USER, "selfie", photo1=(b"just some notes\n", "notes.txt", "text/plain"))
        assert await answer_of(fake, notes, mark) == t("image.not_image", "en")
        assert await send_selfie(fake, plain_jpeg()) == t("selfie.no_face", "en")
        # In a server the photo is not taken: the user is asked, privately, to use the DM.
        room = fake.guild_channel()
        mark = fake.mark()
        public = fake.slash(USER, "selfie", channel=room, photo1=(faces_dir / "obama3.jpg").read_bytes())
        hint = await answer_of(fake, public, mark)
        assert hint == t("intake.group", "en", name="Ann") and fake.interaction_responses(public)[0].flags & EPHEMERAL
        assert fake.find("POST", rf"/channels/{room['id']}/messages") == []
        stored = await service.storage.selfies(f"discord:{USER}")
        assert len(stored) == 2 and all(Path(s.path).exists() for s in stored)


async def test_style_defers_edits_progress_and_delivers_images(fake_discord: FakeDiscord, settings: Settings,
                                                                faces_dir: Path, portrait_ready: None) -> None:
    fake = fake_discord
    configure_logging(settings)
    async with open_service(settings, extra_kinds=[FAKE_PORTRAIT, FAKE_IDENTITY]) as service:
        assert (await send_selfie(fake, (faces_dir / "obama.jpg").read_bytes())).startswith("Got it")
        room = fake.guild_channel()
        posts = rf"/channels/{room['id']}/messages"
        mark = fake.mark()
        styled = fake.slash(USER, "style", channel=room, style="hanfu", count=2)
        # The result is edited into the job's progress message (no separate "Done" message).
        result = await fake.wait_for_files(posts, since=mark)
        await fake.wait_idle()

        callback = fake.interaction_responses(styled)[0]
        assert callback.json["type"] == 5 and styled.response_delay < INTERACTION_DEADLINE_S
        # The queued notice is a normal channel message with the Cancel button: the progress message.
        queued = fake.find("POST", posts, since=mark)[0]
        (job,) = [j for j in await service.storage.user_jobs(f"discord:{USER}", ["delivered"]) if j.kind == "portrait"]
        assert queued.custom_ids() == [f"fc:cancel:{job.id}"] and "Portraits" in (queued.content or "")
        assert queued.content.startswith(f"<@{USER}> ")  # in a server it names whom it is for
        progress_id = queued.response["id"]
        edits = fake.find("PATCH", rf"{posts}/{progress_id}", since=mark)
        assert any("100%" in (e.content or "") for e in edits)
        assert edits[-1] is result and fake.find("POST", posts, since=mark) == [queued]
        # The result: both images in one message with the caption and persistent "More like this" buttons.
        artifacts = await service.storage.job_artifacts(job.id)
        assert len(artifacts) == 2 and all(a.delivered_at is not None for a in artifacts)
        assert [data for _, data in result.files] == [Path(a.path).read_bytes() for a in artifacts]
        caption = t("portrait.caption", "en", style="Hanfu")
        assert result.content.startswith(f"<@{USER}> {caption}") and "AI-generated" in result.content
        expected = ["fc:" + b.payload for row in buttons.result_keyboard(artifacts, "en") or [] for b in row]
        assert set(expected) <= set(result.custom_ids()) and len(result.custom_ids()) <= 25
        assert {f"fc:more:{a.id}" for a in artifacts} | {f"fc:report:{a.id}" for a in artifacts} <= set(result.custom_ids())
        assert fake.interaction_responses(styled)[-1].method == "DELETE"  # the "thinking…" went away

        # Someone else presses the button: refused privately, nothing queued for them.
        mark = fake.mark()
        press = fake.press(OTHER, result.response, f"fc:more:{artifacts[0].id}")
        note = await fake.wait_for("POST", WEBHOOK, lambda r: press.token in r.path, since=mark)
        assert note.content == t("button.not_yours", "en") and note.flags & EPHEMERAL
        assert fake.interaction_responses(press)[0].json["type"] == 6
        assert press.response_delay < INTERACTION_DEADLINE_S
        assert await service.storage.user_jobs(f"discord:{OTHER}", ["queued", "running", "done", "delivered"]) == []
        # The requester's own press queues more portraits in the same style.
        mark = fake.mark()
        fake.press(USER, result.response, f"fc:more:{artifacts[1].id}")
        again = await fake.wait_for_files(posts, since=mark)
        assert again.content.startswith(f"<@{USER}> {caption}")
        await fake.wait_idle()
    # Jobs keep channel and message ids only: no interaction token is stored anywhere.
    tokens = [i.token for i in fake.interactions.values()]
    assert user_traces(settings.data_dir, settings.db_path, tokens) == []


async def test_delete_asks_then_erases_everything(fake_discord: FakeDiscord, settings: Settings, faces_dir: Path,
                                                  render_command: None) -> None:
    fake = fake_discord
    configure_logging(settings)
    async with open_service(settings, extra_kinds=[SLEEP_KIND]) as service:
        await send_selfie(fake, (faces_dir / "obama.jpg").read_bytes())
        mark = fake.mark()
        fake.slash(USER, "render")
        await fake.wait_for_files(rf"/channels/{dm_id(fake)}/messages", since=mark)
        mark = fake.mark()
        status = fake.slash(USER, "status")
        assert t("status.selfies", "en", count=1, max=settings.limits.max_selfies) in await answer_of(fake, status, mark)

        mark = fake.mark()
        ask = fake.slash(USER, "delete")
        question = await fake.wait_for("PATCH", WEBHOOK + "/messages/@original",
                                       lambda r: ask.token in r.path, since=mark)
        assert question.content == t("delete.confirm", "en")
        confirm = next(c for c in question.custom_ids() if c.startswith("fc:delete:"))
        assert any(c.startswith("fc:keep:") for c in question.custom_ids())
        mark = fake.mark()
        press = fake.press(USER, ask.original_id or 0, confirm)
        done = await fake.wait_for("PATCH", WEBHOOK + "/messages/@original", lambda r: press.token in r.path,
                                   since=mark, timeout=15)
        assert done.content == t("delete.done", "en") and done.custom_ids() == []
        assert fake.interaction_responses(press)[0].json["type"] == 6
        await fake.wait_idle()
        assert await service.storage.selfies(f"discord:{USER}") == []

    # Nothing is left of the user: not their key, their id, nor their DM channel's id.
    traces = user_traces(settings.data_dir, settings.db_path, [f"discord:{USER}", str(USER), dm_id(fake)])
    assert traces == []


async def test_expired_interaction_tokens_still_deliver_as_normal_messages(
        fake_discord: FakeDiscord, settings: Settings, faces_dir: Path, portrait_ready: None) -> None:
    fake = fake_discord
    configure_logging(settings)
    async with open_service(settings, extra_kinds=[FAKE_PORTRAIT, FAKE_IDENTITY]):
        await send_selfie(fake, (faces_dir / "obama.jpg").read_bytes())
        await fake.wait_idle()
        fake.expire_tokens()  # from now on every follow-up and response edit answers 401, code 50027
        dm_posts = rf"/channels/{dm_id(fake)}/messages"
        mark = fake.mark()
        fake.slash(USER, "style", style="no-such-style")
        await fake.wait_for("POST", dm_posts, lambda r: "no-such-style" in (r.content or ""), since=mark)
        mark = fake.mark()
        fake.slash(USER, "style", style="hanfu")
        result = await fake.wait_for_files(dm_posts, since=mark)
        assert result.content.startswith(t("portrait.caption", "en", style="Hanfu")) and "AI-generated" in result.content
        await fake.wait_idle()
    refused = [r for r in fake.requests if r.path.startswith("/webhooks/") and not r.ok]
    assert refused and {r.response["code"] for r in refused} == {50027}
    assert [r for r in fake.requests[mark:] if r.path.startswith("/webhooks/") and r.ok] == []


async def test_gateway_outage_mid_job_loses_nothing(fake_discord: FakeDiscord, settings: Settings,
                                                    render_command: None, caplog: pytest.LogCaptureFixture) -> None:
    fake = fake_discord
    configure_logging(settings)
    caplog.set_level(logging.DEBUG)
    async with open_service(settings, extra_kinds=[SLEEP_KIND]) as service:
        dm_posts = rf"/channels/{dm_id(fake)}/messages"
        mark = fake.mark()
        fake.slash(USER, "render")
        queued = await fake.wait_for("POST", dm_posts, since=mark)
        await fake.wait_for("PATCH", rf"{dm_posts}/{queued.response['id']}", since=mark)  # running
        # The gateway goes away mid-job and refuses to come back for a while.
        fake.gateway_down = True
        await fake.disconnect()
        during = fake.slash(USER, "status")  # queued by the gateway until the session resumes
        result = await fake.wait_for_files(dm_posts, since=mark)
        assert fake.connections == ["identify"]  # the result came while the gateway was still down
        fake.gateway_down = False
        await fake.wait_connected(2, timeout=30)
        assert fake.connections == ["identify", "resume"]
        # The command sent during the outage is answered once the session resumed (in its response,
        # or, when the resume came after its 3 s, as a plain DM).
        selfies = t("status.selfies", "en", count=0, max=settings.limits.max_selfies)

        def answered(request: ApiRequest) -> bool:
            return (during.token in request.path or request.path == dm_posts) and selfies in (request.content or "")

        await fake.wait_for("*", r".*", answered, timeout=15, since=mark)
        (job,) = await service.storage.user_jobs(f"discord:{USER}", ["delivered"])
        (artifact,) = await service.storage.job_artifacts(job.id)
        assert [data for _, data in result.files] == [Path(artifact.path).read_bytes()]
    assert TOKEN not in caplog.text


async def test_telegram_and_discord_run_in_one_process(fake_discord: FakeDiscord, fake_telegram: FakeTelegram,
                                                        tmp_path: Path, yunet_path: Path, render_command: None) -> None:
    settings = fake_telegram.bot_settings(
        discord=fake_discord.discord_settings(), data_dir=tmp_path / "data", models_dir=yunet_path.parent,
        log_level="DEBUG",  # as the other tests: configure_logging quiets httpx globally at INFO
        selfie={"detector_model": yunet_path.name}, scheduler={"progress_interval_s": 0})
    configure_logging(settings)
    telegram_user = 987654321
    async with open_service(settings, extra_kinds=[SLEEP_KIND]) as service:
        assert set(service.adapters) == {"telegram", "discord"}
        fake_telegram.send_message(telegram_user, None, "/render")
        fake_discord.slash(USER, "render")
        await fake_telegram.wait_for("sendPhoto", timeout=30)
        upload = await fake_discord.wait_for_files(rf"/channels/{dm_id(fake_discord)}/messages")
        await fake_discord.wait_idle()
        for key in (f"telegram:{telegram_user}", f"discord:{USER}"):
            (job,) = await service.storage.user_jobs(key, ["delivered"])
            assert job.chat["platform"] == key.split(":")[0]
        (artifact,) = await service.storage.job_artifacts(job.id)
        assert [data for _, data in upload.files] == [Path(artifact.path).read_bytes()]


@pytest.fixture(scope="module")
def tiny_cartoon_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_cartoon_models(tmp_path_factory.mktemp("tiny_cartoon"))


async def test_cartoon_with_photo_and_style_options_delivers_the_cartoon(
        fake_discord: FakeDiscord, settings: Settings, faces_dir: Path, tiny_cartoon_models: dict[str, Path]) -> None:
    fake = fake_discord
    face = Image.open(faces_dir / "obama.jpg").convert("RGB")
    buf = io.BytesIO()
    face.resize((face.width // 2, face.height // 2)).save(buf, "JPEG", quality=92)
    sent = buf.getvalue()
    settings = settings.model_copy(update={"model_paths": tiny_cartoon_models})
    async with open_service(settings) as service:
        assert "cartoon" in service.services.features_installed
        posts = rf"/channels/{dm_id(fake)}/messages"
        mark = fake.mark()
        asked = fake.slash(USER, "cartoon", style="anime", photo=sent)
        result = await fake.wait_for_files(posts, since=mark)
        await fake.wait_idle()
        (job,) = await service.storage.user_jobs(f"discord:{USER}", ["delivered"])
    assert job.kind == "cartoon" and job.params["style"] == "anime"
    assert fake.interaction_responses(asked)[0].json["type"] == 5
    assert asked.response_delay < INTERACTION_DEADLINE_S
    assert result.content.startswith(t("cartoon.caption", "en", style="Anime portrait"))
    ((_, picture),) = result.files
    cartoon = np.asarray(Image.open(io.BytesIO(picture)).convert("RGB"), dtype=np.int16)
    original = np.asarray(Image.open(io.BytesIO(sent)).convert("RGB"), dtype=np.int16)
    assert cartoon.shape == original.shape  # the attachment was the picture cartoonised
    assert np.abs(cartoon - original).mean() > 10  # stylised, not sent back
