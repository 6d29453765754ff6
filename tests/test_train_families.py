"""/train per base family through the service and the real PTB Application (the training itself stands in:
tests/test_train_lora*.py train for real): the families the operator enables each get a job, and a style whose
family has no LoRA for the user runs train-free and says so."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bot.app import open_service
from bot.engine.jobkinds import LONG, JobKind
from facechain_core import train_lora, train_lora_sdxl
from facechain_core.devtools import SleepPipeline
from facechain_core.pipeline import JobResult, Progress
from handlers.messages import t
from handlers.portrait import LORA_WEIGHTS
from tests.fixtures.fake_telegram import FakeTelegram
from tests.test_groups_telegram import ANN, BOB, FEATURES, IDENTITY, PORTRAIT, in_chat, jobs_of, private_selfie, \
    settings_for

pytestmark = pytest.mark.timeout(120)


class TrainStandIn(SleepPipeline):
    """Stands in for SD1.5 training: writes the weights file under its real name in the job's folder."""

    weight_name = LORA_WEIGHTS["sd15"]

    def run(self, params: dict, progress: Progress) -> JobResult:
        done = super().run({**params, "steps": 1, "delay_s": 0.0}, progress)
        Path(done.files[0]).unlink()
        weights = Path(params["out_dir"]) / self.weight_name
        weights.parent.mkdir(parents=True, exist_ok=True)
        weights.write_bytes(b"stand-in")
        return JobResult(files=[weights], meta={"steps": 1})


class SdxlTrainStandIn(TrainStandIn):
    weight_name = LORA_WEIGHTS["sdxl"]


TRAIN = JobKind("train", "tests.test_train_families:TrainStandIn", LONG, 1, 60)
TRAIN_SDXL = JobKind("train_sdxl", "tests.test_train_families:SdxlTrainStandIn", LONG, 1, 60)
SDXL_STYLE = "business_headshot_xl"


@pytest.fixture
def sdxl_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("bot.app.installed_features",
                        lambda *args, **kwargs: set(FEATURES) | {"portrait-sdxl", "train-sdxl"})


async def _portrait(fake: FakeTelegram, service: Any, user: Any, style: str) -> tuple[Any, Any]:
    """The user's /style in private; returns the photo sent and the job."""
    before = {j.id for j in await jobs_of(service, user, "portrait")}
    mark = fake.mark()
    fake.send_message(user, None, f"/style {style} 1")
    sent = await fake.wait_for("sendPhoto", in_chat(user.id), since=mark, timeout=30)
    (job,) = [j for j in await jobs_of(service, user, "portrait") if j.id not in before]
    return sent, job


async def _train(fake: FakeTelegram, service: Any, user: Any, codes: list[str]) -> None:
    mark = fake.mark()
    fake.send_message(user, None, "/train")
    for code in codes:
        await fake.wait_for("sendMessage", lambda c: c.params.get("text") == t(code, "en", steps=1), since=mark,
                            timeout=30)
    await fake.wait_idle()


def test_the_weight_names_are_the_trainers() -> None:
    assert LORA_WEIGHTS == {"sd15": train_lora.WEIGHT_NAME, "sdxl": train_lora_sdxl.WEIGHT_NAME}


async def test_an_sd15_lora_leaves_sdxl_styles_train_free_and_says_so(
        fake_telegram: FakeTelegram, tmp_path: Path, yunet_path: Path, faces_dir: Path, sdxl_installed: None) -> None:
    fake = fake_telegram
    settings = settings_for(fake, tmp_path, yunet_path, scheduler={"progress_interval_s": 0})
    async with open_service(settings, extra_kinds=[PORTRAIT, IDENTITY, TRAIN, TRAIN_SDXL]) as service:
        await private_selfie(fake, ANN, (faces_dir / "obama.jpg").read_bytes())
        await _train(fake, service, ANN, ["portrait.lora_ready"])  # train_families defaults to SD1.5 only
        assert [j.kind for j in await jobs_of(service, ANN) if j.kind.startswith("train")] == ["train"]
        note = t("portrait.train_free", "en", family="SDXL")

        sent, job = await _portrait(fake, service, ANN, SDXL_STYLE)
        assert job.params["user_lora"] is None and job.params["train_free_family"] == "sdxl"
        assert note in sent.params["caption"]

        sent, job = await _portrait(fake, service, ANN, "hanfu")
        assert job.params["user_lora"].endswith(f"/lora/{LORA_WEIGHTS['sd15']}")
        assert "train_free_family" not in job.params
        assert "train-free" not in sent.params["caption"]

        # Someone who never trained gets no note: every style is train-free for them.
        await private_selfie(fake, BOB, (faces_dir / "obama.jpg").read_bytes())
        sent, job = await _portrait(fake, service, BOB, SDXL_STYLE)
        assert job.params["user_lora"] is None and "train-free" not in sent.params["caption"]
        await fake.wait_idle()


async def test_train_families_each_get_their_lora(fake_telegram: FakeTelegram, tmp_path: Path, yunet_path: Path,
                                                  faces_dir: Path, sdxl_installed: None) -> None:
    fake = fake_telegram
    settings = settings_for(fake, tmp_path, yunet_path, scheduler={"progress_interval_s": 0},
                            training={"train_families": ["sd15", "sdxl"]})
    async with open_service(settings, extra_kinds=[PORTRAIT, IDENTITY, TRAIN, TRAIN_SDXL]) as service:
        await private_selfie(fake, ANN, (faces_dir / "obama.jpg").read_bytes())
        await _train(fake, service, ANN, ["portrait.lora_ready", "portrait.lora_ready_sdxl"])
        assert sorted(j.kind for j in await jobs_of(service, ANN) if j.kind.startswith("train")) == [
            "train", "train_sdxl"]
        for style, family in ((SDXL_STYLE, "sdxl"), ("hanfu", "sd15")):
            sent, job = await _portrait(fake, service, ANN, style)
            assert job.params["user_lora"].endswith(f"/lora/{LORA_WEIGHTS[family]}")
            assert "train_free_family" not in job.params and "train-free" not in sent.params["caption"]
        await fake.wait_idle()
