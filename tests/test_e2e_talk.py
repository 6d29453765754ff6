"""/talk through the whole service (storage, scheduler, worker process, handlers, the real PTB Application)
against the fake Bot API, with the tiny Wav2Lip-signature model and the offline TTS."""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
from PIL import Image

from bot.app import open_service
from facechain_core.safety import label_text
from facechain_core.tiny.cartoon import build_cartoon_models
from facechain_core.tiny.talk import build_talk_models
from handlers.messages import t
from tests.fixtures.fake_discord import fake_discord  # noqa: F401
from tests.fixtures.fake_telegram import FakeTelegram

pytestmark = pytest.mark.timeout(120)

ANN, BOB = 424242, 515151
DISCORD_USER = 412345678901234567
GROUP = -100900


@pytest.fixture
def settings(fake_telegram: FakeTelegram, tmp_path: Path, yunet_path: Path) -> Any:
    return fake_telegram.bot_settings(
        data_dir=tmp_path / "data", models_dir=yunet_path.parent, selfie={"detector_model": yunet_path.name},
        scheduler={"progress_interval_s": 0},
        model_paths={**build_talk_models(tmp_path / "models"), **build_cartoon_models(tmp_path / "models")},
        pipeline={"talk_max_side": 256, "talk_round_side": 160},
    )


@pytest.fixture
def face_jpeg(faces_dir: Path) -> bytes:
    image = Image.open(faces_dir / "obama.jpg").convert("RGB")
    image = image.resize((image.width // 2, image.height // 2))
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=92)
    return buf.getvalue()


def _voice_message(seconds: float = 1.2) -> bytes:
    """An OGG/Opus voice message as Telegram clients send them: a rising and falling hum."""
    rate = 48_000
    t_ = np.arange(int(seconds * rate)) / rate
    samples = (0.4 * np.sin(np.pi * t_ / seconds) * np.sin(2 * np.pi * 180 * t_)).astype(np.float32)
    buf = io.BytesIO()
    with av.open(buf, "w", format="ogg") as container:
        stream = container.add_stream("libopus", rate=rate, layout="mono")
        frame = av.AudioFrame.from_ndarray(samples[None], format="flt", layout="mono")
        frame.sample_rate = rate
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            container.mux(packet)
    return buf.getvalue()


def _video_info(data: bytes) -> dict[str, Any]:
    with av.open(io.BytesIO(data)) as container:
        video, audio = container.streams.video[0], container.streams.audio[0]
        return {"size": (video.width, video.height), "video_s": float(video.duration * video.time_base),
                "audio_s": float(audio.duration * audio.time_base), "comment": container.metadata.get("comment")}


async def test_talk_with_text_and_with_a_voice_message(fake_telegram: FakeTelegram, settings: Any,
                                                       face_jpeg: bytes) -> None:
    fake = fake_telegram
    async with open_service(settings) as service:
        assert "talk" in service.services.features_installed
        mark = fake.mark()
        fake.send_photo(ANN, None, face_jpeg)  # a selfie: the portrait /talk uses
        await fake.wait_for("sendMessage", since=mark, timeout=15)

        # /talk hello: queued, then a video whose caption says the lip-sync model ran.
        mark = fake.mark()
        fake.send_message(ANN, None, "/talk Hello everyone")
        queued = await fake.wait_for("sendMessage", since=mark, timeout=10)
        assert t("job.kind.talk", "en") in queued.params["text"]
        sent = await fake.wait_for("sendVideo", since=mark, timeout=60)
        assert sent.params["caption"].startswith(t("talk.caption_lipsync", "en"))
        assert t("safety.ai_note", "en", service="FaceChain Bot") in sent.params["caption"]
        (video,) = fake.uploads(sent)
        info = _video_info(video)
        assert info["comment"] == label_text("FaceChain Bot", "video") and max(info["size"]) == 256
        assert abs(info["video_s"] - info["audio_s"]) <= 1 / 25 and info["audio_s"] > 0.5

        # /talk alone asks for a voice message; the voice message comes back as a video of its length.
        mark = fake.mark()
        fake.send_message(ANN, None, "/talk")
        asked = await fake.wait_for("sendMessage", since=mark, timeout=10)
        assert asked.params["text"] == t("talk.send_voice", "en", max_seconds=30)
        mark = fake.mark()
        fake.send_media(ANN, None, "voice", _voice_message(1.2), mime="audio/ogg", duration=1)
        voiced = await fake.wait_for("sendVideo", since=mark, timeout=60)
        info = _video_info(fake.uploads(voiced)[0])
        assert abs(info["video_s"] - 1.2) <= 1 / 25 + 0.03

        # /talk round: a round video note.
        mark = fake.mark()
        fake.send_message(ANN, None, "/talk round Hi")
        note = await fake.wait_for("sendVideoNote", since=mark, timeout=60)
        assert _video_info(fake.uploads(note)[0])["size"] == (160, 160)
        await fake.wait_idle()

        jobs = [j for j in await service.storage.user_jobs(f"telegram:{ANN}", ["delivered"]) if j.kind == "talk"]
        assert len(jobs) == 3
        for job in jobs:  # the input copies go once delivered; the video stays
            assert not Path(job.params["image"]).exists()
            (artifact,) = await service.storage.job_artifacts(job.id)
            assert Path(artifact.path).is_file() and artifact.media_type == "video/mp4"


async def test_only_the_requesters_own_photo_talks(fake_telegram: FakeTelegram, settings: Any,
                                                   face_jpeg: bytes) -> None:
    fake = fake_telegram
    async with open_service(settings) as service:
        mark = fake.mark()
        ann_photo = fake.send_photo(ANN, GROUP, face_jpeg)
        await fake.wait_for("sendMessage", since=mark, timeout=10)
        mark = fake.mark()
        fake.send_message(BOB, GROUP, "/talk Hello", reply_to_message=ann_photo)
        refused = await fake.wait_for("sendMessage", since=mark, timeout=10)
        assert refused.params["text"] == t("talk.not_yours", "en")
        mark = fake.mark()
        fake.send_message(BOB, GROUP, "/talk Hello")  # no photo of his own anywhere
        refused = await fake.wait_for("sendMessage", since=mark, timeout=10)
        assert refused.params["text"] == t("talk.no_portrait", "en")
        await fake.wait_idle()
        assert await service.storage.user_jobs(f"telegram:{BOB}", ["queued", "running", "done", "delivered"]) == []


async def test_make_it_talk_under_a_result(fake_telegram: FakeTelegram, settings: Any, face_jpeg: bytes) -> None:
    fake = fake_telegram
    async with open_service(settings) as service:
        mark = fake.mark()
        photo = fake.send_photo(ANN, None, face_jpeg)
        await fake.wait_for("sendMessage", since=mark, timeout=15)
        mark = fake.mark()
        fake.send_message(ANN, None, "/cartoon anime", reply_to_message=photo)
        result = await fake.wait_for("sendPhoto", since=mark, timeout=30)
        rows = result.result["reply_markup"]["inline_keyboard"]
        talk_button = next(b for row in rows for b in row if b["callback_data"].startswith("talk:"))
        assert talk_button["text"] == t("talk.button", "en")

        fake.press_button(result.result, talk_button["callback_data"], user=BOB)  # not his result
        await fake.wait_idle()
        mark = fake.mark()
        fake.press_button(result.result, talk_button["callback_data"])
        asked = await fake.wait_for("sendMessage", since=mark, timeout=10)
        assert asked.params["text"] == t("talk.send_voice", "en", max_seconds=30)
        mark = fake.mark()
        fake.send_media(ANN, None, "voice", _voice_message(0.8), mime="audio/ogg", duration=1)
        sent = await fake.wait_for("sendVideo", since=mark, timeout=60)
        assert abs(_video_info(fake.uploads(sent)[0])["video_s"] - 0.8) <= 1 / 25 + 0.03
        await fake.wait_idle()
        (job,) = [j for j in await service.storage.user_jobs(f"telegram:{ANN}", ["delivered"]) if j.kind == "talk"]
        assert await service.storage.user_jobs(f"telegram:{BOB}", ["queued", "running", "done", "delivered"]) == []


def _closed_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def test_voice_choice_reaches_the_talk_job_and_the_privacy_note(fake_telegram: FakeTelegram, tmp_path: Path,
                                                                      yunet_path: Path, face_jpeg: bytes) -> None:
    fake = fake_telegram
    settings = fake.bot_settings(  # edge-tts on, but pointed at a closed port: espeak-ng speaks in the end
        data_dir=tmp_path / "data", models_dir=yunet_path.parent, selfie={"detector_model": yunet_path.name},
        scheduler={"progress_interval_s": 0}, model_paths=build_talk_models(tmp_path / "models"),
        pipeline={"talk_max_side": 256, "talk_tts": ["edge", "espeak"],
                  "talk_edge_proxy": f"http://127.0.0.1:{_closed_port()}"},
    )
    async with open_service(settings) as service:
        mark = fake.mark()
        fake.send_photo(ANN, None, face_jpeg)
        await fake.wait_for("sendMessage", since=mark, timeout=15)
        mark = fake.mark()
        fake.send_message(ANN, None, "/voice")
        listed = await fake.wait_for("sendMessage", since=mark, timeout=10)
        assert listed.params["text"] == t("talk.voice_choose", "en")
        rows = listed.result["reply_markup"]["inline_keyboard"]
        choices = {b["callback_data"]: b["text"] for row in rows for b in row if b["callback_data"].startswith("voice:")}
        assert choices["voice:en-US-EmmaMultilingualNeural"] == "✓ Emma (en-US) · online"  # the default, ticked
        assert choices["voice:espeak"] == t("talk.voice_offline", "en") and len(choices) == 9
        order = [row[0]["callback_data"] for row in rows]  # by language: English, then Mandarin, then espeak
        assert order.index("voice:en-GB-RyanNeural") < order.index("voice:zh-CN-XiaoxiaoNeural") < len(order) - 1
        assert all(row[1]["callback_data"] == "voicetry:" + row[0]["callback_data"][6:] for row in rows)

        mark = fake.mark()
        fake.press_button(listed.result, "voice:en-GB-RyanNeural")
        answered = await fake.wait_for("answerCallbackQuery", since=mark, timeout=10)
        assert answered.params["text"] == t("talk.voice_set", "en", voice="Ryan (en-GB) · online")
        assert await service.storage.user_voice(f"telegram:{ANN}") == "en-GB-RyanNeural"

        mark = fake.mark()
        fake.send_message(ANN, None, "/talk Hello everyone")
        await fake.wait_for("sendVideo", since=mark, timeout=60)
        mark = fake.mark()
        fake.send_message(ANN, None, "/privacy")
        privacy = await fake.wait_for("sendMessage", since=mark, timeout=10)
        assert t("talk.privacy_online", "en") in privacy.params["text"]
        await fake.wait_idle()
        (job,) = [j for j in await service.storage.user_jobs(f"telegram:{ANN}", ["delivered"]) if j.kind == "talk"]
        assert job.params["voice"] == "en-GB-RyanNeural" and job.params["text"] == "Hello everyone"


async def test_voice_offers_only_the_offline_voice_when_edge_is_off(fake_telegram: FakeTelegram,
                                                                    settings: Any) -> None:
    fake = fake_telegram
    async with open_service(settings) as service:  # talk_tts left at its default, ["espeak"]
        mark = fake.mark()
        fake.send_message(ANN, None, "/voice")
        said = await fake.wait_for("sendMessage", since=mark, timeout=10)
        assert said.params["text"] == t("talk.voice_offline_only", "en") and "reply_markup" not in said.params
        mark = fake.mark()
        fake.press_button(said.result, "voice:en-GB-RyanNeural")  # an old button from when edge was on
        answered = await fake.wait_for("answerCallbackQuery", since=mark, timeout=10)
        assert answered.params["text"] == t("button.stale", "en")
        assert await service.storage.user_voice(f"telegram:{ANN}") is None
        mark = fake.mark()
        fake.send_message(ANN, None, "/privacy")
        privacy = await fake.wait_for("sendMessage", since=mark, timeout=10)
        assert t("safety.consent", "en").split(".")[0] in privacy.params["text"]
        assert "Microsoft" not in privacy.params["text"]


async def test_voice_lists_kokoros_voices_and_plays_a_sample(fake_telegram: FakeTelegram, tmp_path: Path,
                                                            yunet_path: Path, kokoro_models: dict[str, Path]) -> None:
    fake = fake_telegram
    settings = fake.bot_settings(
        data_dir=tmp_path / "data", models_dir=yunet_path.parent, selfie={"detector_model": yunet_path.name},
        scheduler={"progress_interval_s": 0}, model_paths=kokoro_models, pipeline={"talk_threads": 1})
    async with open_service(settings) as service:
        assert "talk-voices" in service.services.features_installed
        mark = fake.mark()
        fake.send_message(ANN, None, "/voice")
        listed = await fake.wait_for("sendMessage", since=mark, timeout=10)
        rows = listed.result["reply_markup"]["inline_keyboard"]
        labels = {row[0]["callback_data"]: row[0]["text"] for row in rows}
        assert labels["voice:af_heart"] == "✓ EN · Heart (US, female)"  # English first, its default ticked
        assert labels["voice:zm_009"] == "ZH · Mandarin 3 (male)" and list(labels)[-1] == "voice:espeak"
        assert list(labels).index("voice:bm_george") < list(labels).index("voice:zf_001")

        mark = fake.mark()
        fake.press_button(listed.result, "voicetry:am_michael")
        voiced = await fake.wait_for("sendVoice", since=mark, timeout=60)
        assert voiced.params["caption"] == t("talk.voice_sample_caption", "en", voice="EN · Michael (US, male)")
        (audio,) = fake.uploads(voiced)
        with av.open(io.BytesIO(audio)) as container:
            assert container.streams.audio[0].codec_context.name == "opus"
            assert float(container.duration or 0) / 1e6 > 0.3
        await fake.wait_idle()
        (job,) = [j for j in await service.storage.user_jobs(f"telegram:{ANN}", ["delivered"])
                  if j.kind == "voice_sample"]
        assert job.result["meta"]["engine"] == "kokoro" and job.result["meta"]["voice"] == "am_michael"
        assert job.params["text"] == t("talk.voice_sample_text", "en")
        assert await service.storage.user_voice(f"telegram:{ANN}") is None  # a sample chooses nothing

        mark = fake.mark()
        fake.press_button(listed.result, "voice:zf_001")
        answered = await fake.wait_for("answerCallbackQuery", since=mark, timeout=10)
        assert answered.params["text"] == t("talk.voice_set", "en", voice="ZH · Mandarin 1 (female)")
        assert await service.storage.user_voice(f"telegram:{ANN}") == "zf_001"


async def test_the_animated_mode_reaches_telegram_and_discord(fake_telegram: FakeTelegram, fake_discord: Any,
                                                              tmp_path: Path, yunet_path: Path,
                                                              face_jpeg: bytes) -> None:
    from facechain_core.tiny.head_motion import build_audio2pose

    models = {**build_talk_models(tmp_path / "models"),
              "sadtalker-audio2pose": build_audio2pose(tmp_path / "models" / "a2p.pth")}
    settings = fake_telegram.bot_settings(
        data_dir=tmp_path / "data", models_dir=yunet_path.parent, selfie={"detector_model": yunet_path.name},
        scheduler={"progress_interval_s": 0}, model_paths=models,
        pipeline={"talk_max_side": 192, "talk_mode": "animated", "talk_threads": 1})
    settings = settings.model_copy(update={"discord": fake_discord.discord_settings()})
    async with open_service(settings) as service:
        assert "talk-motion" in service.services.features_installed
        mark = fake_telegram.mark()
        fake_telegram.send_photo(ANN, None, face_jpeg)
        await fake_telegram.wait_for("sendMessage", since=mark, timeout=15)
        mark = fake_telegram.mark()
        fake_telegram.send_message(ANN, None, "/talk Hello everyone")
        sent = await fake_telegram.wait_for("sendVideo", since=mark, timeout=60)
        info = _video_info(fake_telegram.uploads(sent)[0])
        assert abs(info["video_s"] - info["audio_s"]) <= 1 / 25 and max(info["size"]) == 192

        mark = fake_discord.mark()
        fake_discord.slash(DISCORD_USER, "talk", text="Good morning", photo=face_jpeg)
        posted = await fake_discord.wait_for_files(r"/channels/\d+/messages", timeout=60, since=mark)
        ((name, video),) = posted.files
        assert name.endswith(".mp4") and _video_info(video)["audio_s"] > 0.3
        await fake_telegram.wait_idle()
        await fake_discord.wait_idle()
        jobs = [j for key in (f"telegram:{ANN}", f"discord:{DISCORD_USER}")
                for j in await service.storage.user_jobs(key, ["delivered"]) if j.kind == "talk"]
        assert len(jobs) == 2 and all(j.result["meta"]["mode"] == "animated" for j in jobs)
