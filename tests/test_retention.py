"""Retention: with the clock advanced, the cleanup deletes each class of expired data with /delete's
file helpers (the deletion proof passes for it) and leaves unexpired data alone; /privacy tells when."""
from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from bot.config import RetentionSettings
from bot.ops.retention import DAY_S, run_retention, sweep
from bot.storage import Artifact, new_artifact_id
from handlers.messages import t
from tests.fixtures.privacy import user_traces
from tests.fixtures.safety_world import World, event, make_world, private  # noqa: F401

pytestmark = pytest.mark.timeout(60)
USER, REPORTER, BUSY = 21, 22, 23
KEY = f"telegram:{USER}"
RETENTION = {"results_days": 30, "loras_days": 45, "selfies_days": 60, "identities_days": 90}


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path.resolve()


async def _job_with_file(world: World, key: str, kind: str, path: Path, media: str) -> tuple[int, Artifact]:
    job = await world.storage.insert_job(key, kind, 1, {"out_dir": str(path.parent)}, private(USER).to_dict(), 1)
    await world.storage.mark_running(job.id)
    artifact = Artifact(new_artifact_id(), job.id, key, kind, str(path), media)
    await world.storage.finish_job(job.id, {"files": [str(path)]}, [artifact])
    await world.storage.mark_job_delivered(job.id)
    return job.id, artifact


async def _user_with_everything(world: World, key: str) -> dict[str, Any]:
    """Selfies, an identity (its job's artifact), a LoRA with a checkpoint, and a result someone reported."""
    folder = world.services.user_dir(key)
    await world.storage.ensure_user(key, "telegram", "en")
    selfies = [_write(folder / "selfies" / f"selfie{i}aa.jpg", b"jpeg %d" % i) for i in range(2)]
    for path in selfies:
        await world.storage.add_selfie(key, str(path), {"box": [0, 0, 1, 1]})
    identity = _write(folder / "identity.npz", b"identity-embedding")
    await _job_with_file(world, key, "identity", identity, "application/octet-stream")
    await world.storage.set_identity(key, str(identity), 2)
    lora = _write(folder / "lora" / "pytorch_lora_weights.safetensors", b"lora-weights")
    checkpoint = _write(folder / "lora" / "checkpoint-4" / "state.bin", b"checkpoint")
    await _job_with_file(world, key, "train", lora, "application/octet-stream")
    await world.storage.set_lora(key, str(lora))
    result = _write(folder / "jobs" / "77" / "portrait_01_1234.png", b"png result")
    job_id, artifact = await _job_with_file(world, key, "portrait", result, "image/png")
    await world.storage.add_report(artifact.id, key, f"telegram:{REPORTER}", private(REPORTER).key)
    return {"selfies": selfies, "identity": identity, "lora": lora, "checkpoint": checkpoint, "result": result,
            "result_job": job_id, "artifact": artifact.id}


def _traces(world: World, needles: list[str]) -> list[str]:
    return user_traces(world.services.data_dir, world.storage.path, needles)


async def test_each_class_expires_on_its_own_day(make_world) -> None:  # noqa: F811
    world = await make_world(retention=RETENTION)
    retention = RetentionSettings(**RETENTION)
    made = await _user_with_everything(world, KEY)
    start = time.time()

    assert await sweep(world.services, retention, start + 29 * DAY_S) == {}
    assert all(Path(p).exists() for p in (*made["selfies"], made["identity"], made["lora"], made["result"]))

    # Day 31: the result, its job row, its folder and the report of it go; nothing else does.
    counts = await sweep(world.services, retention, start + 31 * DAY_S)
    assert counts["artifacts"] == 1 and counts["jobs"] == 1 and counts["reports"] == 1 and counts["users"] == 1
    assert not made["result"].exists() and not made["result"].parent.exists()
    assert _traces(world, [made["artifact"], "portrait_01_1234", f"/jobs/{made['result_job']}/"]) == []
    assert (await world.storage.job(made["result_job"])) is None
    assert made["lora"].exists() and made["identity"].exists() and all(p.exists() for p in made["selfies"])
    assert (await world.storage.identity(KEY)).lora_path == str(made["lora"])

    # Day 46: the LoRA with its training folder; the identity stays.
    await sweep(world.services, retention, start + 46 * DAY_S)
    assert not made["lora"].parent.exists()
    identity = await world.storage.identity(KEY)
    assert identity is not None and identity.lora_path is None
    assert _traces(world, ["pytorch_lora_weights", "checkpoint-4"]) == []
    assert made["identity"].exists() and len(await world.storage.selfies(KEY)) == 2

    # Day 61: the selfies; day 91: the identity and its job's artifact.
    await sweep(world.services, retention, start + 61 * DAY_S)
    assert await world.storage.selfies(KEY) == [] and not any(p.exists() for p in made["selfies"])
    assert _traces(world, ["selfie0aa", "selfie1aa"]) == [] and made["identity"].exists()
    await sweep(world.services, retention, start + 91 * DAY_S)
    assert await world.storage.identity(KEY) is None and not made["identity"].exists()
    assert _traces(world, ["identity.npz", "identity-embedding"]) == []
    # What is left of the user is their row (language), and their folder is gone with its contents.
    assert not world.services.user_dir(KEY).exists()
    assert (await world.storage.stored_summary(KEY))["jobs"] == 0


async def test_unexpired_data_and_busy_users_stay(make_world) -> None:  # noqa: F811
    world = await make_world(retention={**RETENTION, "selfies_days": 0})  # 0: selfies kept until /delete
    retention = world.services.settings.retention
    made = await _user_with_everything(world, KEY)
    busy = await _user_with_everything(world, f"telegram:{BUSY}")
    await world.jobs.submit(f"telegram:{BUSY}", "demo", {}, private(BUSY))  # a job in flight
    later = time.time() + 400 * DAY_S

    await sweep(world.services, retention, later)
    assert all(p.exists() for p in made["selfies"]) and len(await world.storage.selfies(KEY)) == 2
    assert not made["result"].exists() and not made["identity"].exists()
    for path in (*busy["selfies"], busy["identity"], busy["lora"], busy["result"]):
        assert path.exists(), path  # untouched while its job runs
    world.jobs.active.clear()
    await sweep(world.services, retention, later)
    assert not busy["result"].exists() and not busy["lora"].exists() and busy["selfies"][0].exists()


async def test_privacy_shows_what_is_kept_and_when_it_goes(make_world) -> None:  # noqa: F811
    world = await make_world(retention=RETENTION)
    await _user_with_everything(world, KEY)
    channel = await world.send(event(USER, "/privacy"))
    text = channel.said[-1]

    def on(days: float) -> str:
        return t("privacy.expires", "en", date=time.strftime("%Y-%m-%d", time.gmtime(world.start + days * DAY_S)))

    made = time.strftime("%Y-%m-%d", time.gmtime(world.start))
    assert t("privacy.selfies", "en", count=2, made=made, expiry=on(60)) in text
    assert t("privacy.results", "en", count=1, made=made, expiry=on(30)) in text
    assert t("privacy.loras", "en", count=1, made=made, expiry=on(45)) in text
    assert t("privacy.identities", "en", count=1, made=made, expiry=on(90)) in text
    assert "/delete" in text
    channel = await world.send(event(REPORTER, "/privacy"))
    assert t("privacy.reports", "en", count=1) in channel.said[-1]


async def test_the_periodic_task_sweeps_with_its_clock(make_world) -> None:  # noqa: F811
    world = await make_world(retention={**RETENTION, "sweep_interval_s": 0.05})
    made = await _user_with_everything(world, KEY)
    now = [time.time()]
    task = asyncio.create_task(run_retention(world.services, world.services.settings.retention, lambda: now[0]))
    try:
        await asyncio.sleep(0.2)
        assert made["result"].exists()
        now[0] += 31 * DAY_S
        deadline = asyncio.get_running_loop().time() + 5
        while made["result"].exists():
            assert asyncio.get_running_loop().time() < deadline, "the task never swept"
            await asyncio.sleep(0.05)
        assert made["lora"].exists()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_files_outside_the_users_folder_are_never_removed(make_world, tmp_path) -> None:  # noqa: F811, ANN001
    world = await make_world(retention=RETENTION)
    await world.storage.ensure_user(KEY, "telegram", "en")
    outside = _write(tmp_path / "elsewhere" / "selfie.jpg", b"not the bot's")
    await world.storage.add_selfie(KEY, str(outside), {})
    await sweep(world.services, RetentionSettings(**RETENTION), time.time() + 61 * DAY_S)
    assert outside.exists() and await world.storage.selfies(KEY) == []


async def _end(world: World, state: str) -> None:
    """Ends every job the world's queue holds, as the scheduler would when they fail or are cancelled."""
    for job_id in list(world.jobs.active):
        await world.storage.end_job(job_id, state)
        world.jobs.active.pop(job_id)


def _photo(data: bytes) -> Any:
    from handlers.protocols import Attachment

    async def fetch() -> bytes:
        return data

    return Attachment("photo", len(data), "image/jpeg", None, fetch)


def _jpeg() -> bytes:
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (64, 64), (90, 120, 150)).save(out, "JPEG")
    return out.getvalue()


async def test_inputs_of_jobs_that_never_delivered_are_swept(make_world) -> None:  # noqa: F811
    """Failed, cancelled and unanswered jobs of each kind leave inputs no row names: /privacy lists them
    and the sweep removes them a day later; what is left is exactly what /privacy lists."""
    world = await make_world(retention=RETENTION)
    world.services.features_installed = {"cartoon", "tryon", "portrait"}
    await world.send(event(USER, "/start"))
    folder = world.services.user_dir(KEY)
    selfie = _write(folder / "selfies" / "keptselfie.jpg", _jpeg())
    await world.storage.add_selfie(KEY, str(selfie), {"box": [0, 0, 1, 1]})

    def sent(text: str, photo: bool = False) -> Any:
        update = event(USER, text)
        if photo:
            update.attachments = [_photo(_jpeg())]
        return update

    await world.send(sent("/cartoon anime", photo=True))  # a cartoon that fails
    await world.send(sent("/tryon", photo=True))  # a try-on that fails
    await _end(world, "failed")
    await world.send(sent("/talk hello there"))  # a talk the user cancels
    await world.send(sent("/train"))  # a training cancelled after its first checkpoint
    _write(folder / "lora" / "checkpoint-4" / "optimizer.bin", b"state")
    await _end(world, "cancelled")
    await world.send(sent("/talk"))  # asks for a voice message that never comes
    await world.send(sent("/cartoon", photo=True))  # style buttons for a photo, never pressed
    leftovers = [p for p in folder.rglob("*") if p.is_file() and p != selfie]
    assert len(leftovers) >= 6, leftovers
    assert not world.jobs.active

    before = (await world.send(event(USER, "/privacy"))).said[-1]
    made = time.strftime("%Y-%m-%d", time.gmtime(world.start))
    assert t("privacy.files", "en", count=len(leftovers), made=made, hours=24) in before, before

    await sweep(world.services, RetentionSettings(**RETENTION), time.time() + 0.5 * DAY_S)
    assert all(p.exists() for p in leftovers)  # not a day old yet
    counts = await sweep(world.services, RetentionSettings(**RETENTION), time.time() + 2 * DAY_S)
    assert counts["files"] == len(leftovers)
    left = sorted(p for p in folder.rglob("*") if p.is_file())
    assert left == [selfie]
    world.now[0] += 2 * DAY_S
    after = (await world.send(event(USER, "/privacy"))).said[-1]
    assert t("privacy.selfies", "en", count=1, made=made, expiry=t(
        "privacy.expires", "en", date=time.strftime("%Y-%m-%d", time.gmtime(world.start + 60 * DAY_S)))) in after
    assert "other file" not in after
