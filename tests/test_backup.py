"""Backup and restore: a running service (fake Bot API) is backed up with a job in flight, restored
into a fresh data dir, and every user, identity, selfie and artifact is found there; the restored
dir then runs the interrupted job to delivery."""
from __future__ import annotations

import asyncio
import io
import tarfile
import time
from pathlib import Path

import pytest

from bot import cli
from bot.app import open_service
from bot.ops.backup import BackupError, backup, restore
from bot.engine.jobkinds import JobKind
from bot.storage import Artifact, Storage, new_artifact_id
from handlers import router
from handlers.progress import submit_with_progress

ANN, BOB = 5151, 5252
SLEEP_KIND = JobKind("test.sleep", "facechain_core.devtools:SleepPipeline", 1, 2, 60)


@pytest.fixture
def render_commands():
    """/render (quick) and /slowrender (about 2 s): test-only commands running the devtools sleep job."""
    def command(steps: int, delay_s: float):
        async def render(services, event, channel):
            # A path among the params (as real jobs have): the ledger gets a line per generation.
            ledger = (services.user_dir(event.user.key) / "ledger.txt").resolve()
            await submit_with_progress(services, event, channel, "test.sleep",
                                       {"steps": steps, "delay_s": delay_s, "suffix": ".png", "ledger": str(ledger)})
        return render
    router.register_command("render", command(2, 0.02), "help.help", in_menu=False)
    router.register_command("slowrender", command(40, 0.05), "help.help", in_menu=False)
    yield
    router._commands.pop("render", None)
    router._commands.pop("slowrender", None)


def _config(path: Path, data_dir: Path) -> Path:
    path.write_text(f'data_dir = "{data_dir}"\n')
    return path


async def _say(fake, user: int, text: str) -> None:
    mark = fake.mark()
    fake.send_message(user, None, text)
    await fake.wait_for("sendMessage", since=mark, timeout=10)


async def _until_state(storage: Storage, job_id: int, states: tuple[str, ...], timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while True:
        job = await storage.job(job_id)
        if job is not None and job.state in states:
            return job
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} is {job.state if job else None}, wanted {states}")
        await asyncio.sleep(0.02)


async def _latest_job(storage: Storage, user_key: str) -> int:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        jobs = await storage.user_jobs(user_key, ("queued", "running", "done", "delivered"))
        if jobs:
            return max(j.id for j in jobs)
        await asyncio.sleep(0.02)
    raise AssertionError("no job")


async def test_backup_while_running_then_restore_into_a_fresh_dir(fake_telegram, tmp_path: Path,
                                                                  render_commands) -> None:
    fake = fake_telegram
    data, restored_dir = tmp_path / "data", tmp_path / "restored"
    archive = tmp_path / "backups" / "fc.tar.gz"
    settings = fake.bot_settings(data_dir=data, models_dir=tmp_path / "models",
                                 scheduler={"progress_interval_s": 0, "shutdown_grace_s": 0})
    ann = f"telegram:{ANN}"
    async with open_service(settings, extra_kinds=[SLEEP_KIND]) as service:
        storage = service.storage
        for user in (ANN, BOB):
            await _say(fake, user, "/start")
        # Ann's selfie and identity, as the selfie handlers leave them (a relative and an absolute path).
        selfie = data / "users" / ann / "selfies" / "1.jpg"
        selfie.parent.mkdir(parents=True)
        selfie.write_bytes(b"\xff\xd8 a selfie")
        await storage.add_selfie(ann, str(selfie), {"box": [1, 2, 3, 4]})
        identity = (data / "users" / ann / "identity.npz").resolve()
        identity.write_bytes(b"an identity embedding")
        await storage.set_identity(ann, str(identity), 1)

        await _say(fake, ANN, "/render")
        done_id = await _latest_job(storage, ann)
        await _until_state(storage, done_id, ("delivered",))
        (artifact,) = await storage.job_artifacts(done_id)
        original = Path(artifact.path).read_bytes()

        await _say(fake, BOB, "/slowrender")
        flight_id = await _latest_job(storage, f"telegram:{BOB}")
        await _until_state(storage, flight_id, ("running",))
        code = await asyncio.to_thread(cli.main, ["--config", str(_config(tmp_path / "a.toml", data)),
                                                  "backup", str(archive)])
        assert code == 0 and archive.is_file()
        assert (await storage.job(flight_id)).state == "running"  # still in flight after the backup

    code = await asyncio.to_thread(cli.main, ["--config", str(_config(tmp_path / "b.toml", restored_dir)),
                                              "restore", str(archive)])
    assert code == 0
    root = restored_dir.resolve()
    async with Storage(restored_dir / "facechain.sqlite3") as restored:
        assert await restored.language_choice(ann) is not None
        assert await restored.language_choice(f"telegram:{BOB}") is not None
        (kept,) = await restored.selfies(ann)
        assert Path(kept.path).is_relative_to(root) and Path(kept.path).read_bytes() == b"\xff\xd8 a selfie"
        found = await restored.identity(ann)
        assert found is not None and Path(found.path) == root / "users" / ann / "identity.npz"
        assert Path(found.path).read_bytes() == b"an identity embedding"
        (copy,) = await restored.job_artifacts(done_id)
        assert (copy.id, copy.delivered_at is not None, copy.file_ids) == (artifact.id, True, artifact.file_ids)
        assert Path(copy.path).is_relative_to(root) and Path(copy.path).read_bytes() == original
        flight = await restored.job(flight_id)
        assert flight.state == "running" and Path(flight.params["ledger"]).is_relative_to(root)
        assert all(Path(p).exists() for p in await restored.file_paths())

    # The restored dir is a working service: the interrupted job runs again and reaches Bob.
    settings = fake.bot_settings(data_dir=restored_dir, models_dir=tmp_path / "models",
                                 scheduler={"progress_interval_s": 0, "shutdown_grace_s": 0})
    mark = fake.mark()
    async with open_service(settings, extra_kinds=[SLEEP_KIND]) as service:
        job = await _until_state(service.storage, flight_id, ("delivered",))
        photo = await fake.wait_for("sendPhoto", since=mark, timeout=10)
        assert photo.params["chat_id"] == BOB
        (result,) = await service.storage.job_artifacts(job.id)
        assert Path(result.path).is_relative_to(root)
    assert (root / "users" / f"telegram:{BOB}" / "ledger.txt").read_text().split() == [str(flight_id)]


async def test_backup_lists_files_that_rows_name_but_are_gone(tmp_path: Path) -> None:
    data = tmp_path / "data"
    async with Storage(data / "facechain.sqlite3") as storage:
        await storage.ensure_user("telegram:1", "telegram", "en")
        kept, gone = data / "users" / "telegram:1" / "a.png", data / "users" / "telegram:1" / "b.png"
        kept.parent.mkdir(parents=True)
        kept.write_bytes(b"kept")
        for path in (kept, gone):
            await storage.add_artifact(Artifact(new_artifact_id(), None, "telegram:1", "test", str(path),
                                                "image/png", created_at=time.time()))
        summary = await backup(data, data / "facechain.sqlite3", tmp_path / "b.tar")
    assert summary.missing == ["users/telegram:1/b.png"]
    assert summary.files == 1 and summary.rows["artifacts"] == 2
    with pytest.raises(BackupError, match="already exists"):
        await backup(data, data / "facechain.sqlite3", tmp_path / "b.tar")


async def test_restore_refuses_a_used_data_dir_and_foreign_archives(tmp_path: Path) -> None:
    data = tmp_path / "data"
    async with Storage(data / "facechain.sqlite3") as storage:
        await storage.ensure_user("telegram:1", "telegram", "en")
    await backup(data, data / "facechain.sqlite3", tmp_path / "ok.tar")
    with pytest.raises(BackupError, match="already holds data"):
        await restore(tmp_path / "ok.tar", data, data / "facechain.sqlite3")

    evil = tmp_path / "evil.tar"
    with tarfile.open(tmp_path / "ok.tar") as source, tarfile.open(evil, "w") as tar:
        for member in source.getmembers():
            tar.addfile(member, source.extractfile(member))
        info = tarfile.TarInfo("../outside.txt")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"bad"))
    with pytest.raises(BackupError, match="unexpected entry"):
        await restore(evil, tmp_path / "fresh", tmp_path / "fresh" / "facechain.sqlite3")
    assert not (tmp_path / "outside.txt").exists()
    assert not (tmp_path / "fresh" / "facechain.sqlite3").exists()

    (tmp_path / "plain.txt").write_text("not an archive")
    with pytest.raises(BackupError, match="not a readable archive"):
        await restore(tmp_path / "plain.txt", tmp_path / "fresh2", tmp_path / "fresh2" / "facechain.sqlite3")


async def test_relocate_paths_moves_relative_absolute_and_nested_json_paths(tmp_path: Path) -> None:
    async with Storage(tmp_path / "db.sqlite3") as storage:
        await storage.ensure_user("telegram:1", "telegram", "en")
        await storage.add_selfie("telegram:1", "data/users/telegram:1/selfies/1.jpg", {})
        await storage.add_selfie("telegram:1", "/srv/fc/data/users/telegram:1/selfies/2.jpg", {})
        await storage.add_selfie("telegram:1", "/elsewhere/data/users/x.jpg", {})  # not under the data dir
        await storage.set_identity("telegram:1", "/srv/fc/data/users/telegram:1/identity.npz", 2)
        await storage.set_lora("telegram:1", "/srv/fc/data/users/telegram:1/lora")
        job = await storage.insert_job("telegram:1", "portrait", 1, {
            "photos": [{"path": "data/users/telegram:1/selfies/1.jpg", "face": {"box": [1, 2]}}],
            "identity": "/srv/fc/data/users/telegram:1/identity.npz", "style": "data-science"}, {}, 2)
        moved = await storage.relocate_paths(["data", "/srv/fc/data/"], "/new/root")
        assert moved == 5
        assert [s.path for s in await storage.selfies("telegram:1")] == [
            "/new/root/users/telegram:1/selfies/1.jpg", "/new/root/users/telegram:1/selfies/2.jpg",
            "/elsewhere/data/users/x.jpg"]
        identity = await storage.identity("telegram:1")
        assert (identity.path, identity.lora_path) == ("/new/root/users/telegram:1/identity.npz",
                                                       "/new/root/users/telegram:1/lora")
        params = (await storage.job(job.id)).params
        assert params == {"photos": [{"path": "/new/root/users/telegram:1/selfies/1.jpg", "face": {"box": [1, 2]}}],
                          "identity": "/new/root/users/telegram:1/identity.npz", "style": "data-science"}
