"""Fast mode through the whole service on tiny models: the operator's default and the user's choice (words in
both languages, the Telegram options panel, Discord's option) reach the job, and a style that opts out runs
normally and says so. The real python-telegram-bot and discord.py clients run against their fakes."""
from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from bot.app import open_service
from facechain_core.accelerators import accelerators
from facechain_core.tiny import build_lora
from handlers.messages import t
from tests.conftest import SHARED, find_asset
from tests.fixtures.fake_discord import FakeDiscord
from tests.fixtures.fake_platforms import fake_platforms
from tests.fixtures.fake_telegram import FakeTelegram, FakeUser
from tests.fixtures.portrait_service import TINY_PIPELINE, tiny_model_paths
from tests.fixtures.service_waits import delivered_job_ids, wait_for_delivered_job, wait_for_identity
from tests.fixtures.tiny_models import one_torch_thread, tiny_models_dir  # noqa: F401

pytestmark = [pytest.mark.timeout(300), pytest.mark.asyncio(loop_scope="module")]

ANN, BOB, CAT = 434343, 535353, 636363
DISCORD_USER = 412345678901234599
LCM_STEPS = accelerators().get("lcm").steps


@dataclass
class World:
    service: Any
    telegram: FakeTelegram
    discord: FakeDiscord
    faces: Path


def _styles(folder: Path) -> Path:
    """The packaged hanfu style and a copy of it that opts out of fast mode."""
    source = Path(__file__).resolve().parent.parent / "styles"
    folder.mkdir()
    shutil.copy(source / "hanfu.toml", folder / "hanfu.toml")
    text = (source / "hanfu.toml").read_text(encoding="utf-8")
    slow = text.replace('id = "hanfu"', 'id = "hanfu_slow"').replace('en = "Hanfu"', 'en = "Hanfu (slow)"')
    slow = slow.replace('zh = "汉服"', 'zh = "汉服（慢）"')
    slow = slow.replace("identity_weight", "fast = false\nidentity_weight", 1)
    assert slow != text and "fast = false" in slow
    (folder / "hanfu_slow.toml").write_text(slow, encoding="utf-8")
    return folder


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def world(tmp_path_factory: pytest.TempPathFactory, tiny_models_dir: Path) -> AsyncIterator[World]:  # noqa: F811
    """The service with fast_mode = "on" and the LCM accelerator pointed at a tiny LoRA of the real format."""
    faces = SHARED / "faces"
    if not faces.is_dir():
        pytest.skip(f"{faces} not present (a fresh clone has no ../shared/)")
    yunet = find_asset("models/yunet_s_640_640.onnx")
    folder = tmp_path_factory.mktemp("fast")
    accelerator = build_lora(tiny_models_dir / "sd15", folder / "lcm.safetensors", seed=41)
    async with fake_platforms() as (telegram, discord):
        settings = telegram.bot_settings(
            discord=discord.discord_settings(), data_dir=folder / "data", models_dir=tiny_models_dir,
            styles_dir=_styles(folder / "styles"),
            model_paths={**tiny_model_paths(tiny_models_dir, yunet), "lcm-lora-sd15": accelerator},
            selfie={"detector_model": str(yunet)}, scheduler={"progress_interval_s": 0},
            limits={"commands_per_minute": 0},
            pipeline={**TINY_PIPELINE, "oversample": 1, "fast_mode": "on"}, portrait_seed=1234)
        async with open_service(settings) as service:
            yield World(service, telegram, discord, faces)


async def _identity(world: World, user: int | FakeUser, photo: str) -> None:
    uid = user.id if isinstance(user, FakeUser) else user
    if await world.service.storage.identity(f"telegram:{uid}") is not None:
        return
    world.telegram.send_photo(user, None, (world.faces / photo).read_bytes())
    await wait_for_identity(world.service, f"telegram:{uid}")


async def _portrait(world: World, user: int | FakeUser, command: str) -> tuple[Any, Any]:
    """Sends `command`; returns the picture's send call and the delivered job."""
    uid = user.id if isinstance(user, FakeUser) else user
    service, fake = world.service, world.telegram
    before = await delivered_job_ids(service, f"telegram:{uid}")
    mark = fake.mark()
    fake.send_message(user, None, command)
    sent = await fake.wait_for("sendPhoto", since=mark, timeout=90)
    return sent, await wait_for_delivered_job(service, f"telegram:{uid}", before, kind="portrait")


async def test_the_operators_default_reaches_the_job_and_it_runs_fast(world: World) -> None:
    assert "fast" in world.service.services.features_installed
    await _identity(world, ANN, "obama.jpg")
    sent, job = await _portrait(world, ANN, "/style hanfu 1")
    assert job.params["fast"] is True and "fast" not in job.params["controls"]
    assert job.result["meta"]["fast"] == "lcm" and job.result["meta"]["steps"] == LCM_STEPS
    assert t("fast.caption", "en", steps=LCM_STEPS) in sent.params["caption"]


async def test_the_users_choice_wins_in_both_languages(world: World) -> None:
    bob = FakeUser(BOB, "Bob", language_code="zh-hans")
    await _identity(world, bob, "biden.jpg")
    sent, job = await _portrait(world, bob, "/style hanfu 1 快速:关")
    assert job.params["controls"]["fast"] == "off" and job.params["fast"] is False
    assert job.result["meta"]["fast"] is None
    assert job.result["meta"]["steps"] == TINY_PIPELINE["sampler_override"]["steps"]
    assert t("fast.caption", "zh", steps=LCM_STEPS) not in sent.params["caption"]
    # A value it does not know is answered in the user's language, and nothing is queued.
    for user, lang, command in ((bob, "zh", "/style hanfu 快速:大"), (ANN, "en", "/style hanfu fast:maybe")):
        mark = world.telegram.mark()
        world.telegram.send_message(user, None, command)
        reply = await world.telegram.wait_for("sendMessage", since=mark, timeout=10)
        assert reply.params["text"] == t("studio.bad_fast", lang)


async def test_a_style_that_opts_out_runs_normally_and_says_so(world: World) -> None:
    await _identity(world, ANN, "obama.jpg")
    sent, job = await _portrait(world, ANN, "/style hanfu_slow 1 fast")
    assert job.params["controls"]["fast"] == "on" and job.params["fast"] is False
    assert job.params["fast_note"] == "fast.skipped_style" and job.result["meta"]["fast"] is None
    assert t("fast.skipped_style", "en") in sent.params["caption"]


async def test_the_panels_speed_row_reaches_the_job(world: World) -> None:
    service, fake = world.service, world.telegram
    await _identity(world, CAT, "obama.jpg")
    mark = fake.mark()
    fake.send_message(CAT, None, "/style hanfu options")
    panel = await fake.wait_for("sendMessage", lambda c: any(p.startswith("optgo:") for p in c.buttons), 10,
                                since=mark)
    panel_id = next(p for p in panel.buttons if p.startswith("optgo:")).partition(":")[2]
    assert t("panel.fast", "en", value=t("panel.fast_default", "en")) in panel.params["text"]
    for choice in ("fast.off", "count.1"):
        mark = fake.mark()
        fake.press_button(panel.result, f"opt:{panel_id}.{choice}", user=CAT)
        edit = await fake.wait_for("editMessageText", since=mark, timeout=10)
    assert t("panel.fast", "en", value=t("panel.fast_off", "en")) in edit.params["text"]
    before = await delivered_job_ids(service, f"telegram:{CAT}")
    mark = fake.mark()
    fake.press_button(panel.result, f"optgo:{panel_id}", user=CAT)
    await fake.wait_for("sendPhoto", since=mark, timeout=90)
    job = await wait_for_delivered_job(service, f"telegram:{CAT}", before, kind="portrait")
    assert job.params["controls"] == {"fast": "off"} and job.params["fast"] is False


async def test_discords_fast_option_reaches_the_job(world: World) -> None:
    service, fake = world.service, world.discord
    user = DISCORD_USER
    fake.slash(user, "selfie", photo1=(world.faces / "obama.jpg").read_bytes())
    await wait_for_identity(service, f"discord:{user}")
    posts = rf"/channels/{fake.dm_channel(user)['id']}/messages"
    mark = fake.mark()
    fake.slash(user, "style", style="hanfu", count=1, fast="off")
    await fake.wait_for_files(posts, timeout=90, since=mark)
    await fake.wait_idle()
    (job,) = [j for j in await service.storage.user_jobs(f"discord:{user}", ["delivered"]) if j.kind == "portrait"]
    assert job.params["controls"] == {"fast": "off"} and job.params["fast"] is False
