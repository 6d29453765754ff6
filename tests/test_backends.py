"""The backend seam: the config chooses the backend, and a job a backend could not take is tried again."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from bot.config import ConfigError, SchedulerSettings
from bot.engine.backends import create_backend
from bot.engine.backends.base import JobOrder, Slot
from bot.engine.backends.local import LocalBackend
from bot.engine.scheduler import Scheduler
from bot.storage import JobState, Storage
from facechain_core.devtools import read_ledger
from tests.test_scheduler import CHAT, RecordingSink, in_state, make_kinds, params, storage, until  # noqa: F401, F811


def test_the_backend_is_chosen_by_the_config_and_ray_missing_is_a_config_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    local = create_backend(SchedulerSettings(memory_budget_mb=512), {}, data_dir=tmp_path, devices=["cpu", "cuda:3"])
    assert isinstance(local, LocalBackend)
    assert [(s.info.name, s.info.device, s.info.gpu_index) for s in local.slots] == [("cpu", "cpu", None),
                                                                                    ("cuda:3", "cuda:0", 3)]
    monkeypatch.setitem(sys.modules, "ray", None)  # as where the extra is not installed
    with pytest.raises(ConfigError, match=r"pip install '\.\[ray\]'"):
        create_backend(SchedulerSettings(backend="ray"), {}, data_dir=tmp_path, devices=["cpu"])


class FlakyBackend(LocalBackend):
    """Refuses the first `failures` dispatches, as a remote worker lost between pick and send does."""

    def __init__(self, failures: int, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.failures = failures

    async def dispatch(self, slot: Slot, orders: list[JobOrder]) -> None:
        if self.failures:
            self.failures -= 1
            raise ConnectionError("the actor is gone")
        await super().dispatch(slot, orders)


@pytest.mark.parametrize(("failures", "state"), [(1, JobState.DELIVERED), (2, JobState.FAILED)])
async def test_a_job_the_backend_could_not_take_is_tried_again_within_its_tries(
        storage: Storage, tmp_path: Path, failures: int, state: str) -> None:
    sink = RecordingSink()
    backend = FlakyBackend(failures, ["cpu"], {"models_dir": str(tmp_path)})
    scheduler = Scheduler(storage, make_kinds(), SchedulerSettings(), data_dir=tmp_path / "data",
                          context={"models_dir": str(tmp_path)}, sink=sink, backend=backend)
    async with scheduler as sched:
        sub = await sched.submit("u:a", "quick", params(tmp_path, "x"), CHAT)
        await until(in_state(storage, [sub.job_id], state))
        later = await sched.submit("u:b", "quick", params(tmp_path, "later"), CHAT)
        await until(in_state(storage, [later.job_id], JobState.DELIVERED))
    job = await storage.job(sub.job_id)
    assert job.attempts == 2 and backend.failures == 0
    if state == JobState.FAILED:
        assert sink.failed[sub.job_id] == {"code": "job.crashed", "details": {"tries": 2}}
    assert read_ledger(tmp_path / "ledger") == (["x", "later"] if state == JobState.DELIVERED else ["later"])
