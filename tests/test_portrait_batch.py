"""Cross-user batching on tiny models: one UNet call per step for the batch, each job's pictures as alone."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from facechain_core.errors import JobCancelled, UserFacingError
from facechain_core.identity import Identity, normalise, save_identity
from facechain_core.pipeline import JobResult, PipelineContext
from facechain_core.portrait import PortraitPipeline
from facechain_core.portrait_batch import batch_plan
from tests.fixtures.batch_pass import ForwardCalls, result_pixels
from tests.fixtures.progress import StepRecorder
from tests.fixtures.tiny_models import one_torch_thread, tiny_models, tiny_models_dir  # noqa: F401

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

STEPS = 3


def _style(**changes: Any) -> dict[str, Any]:
    style = {
        "id": "studio", "family": "sd15", "prompt": "{subject}, studio portrait", "negative_prompt": "blurry",
        "identity_weight": 1.0,
        "sampler": {"scheduler": "dpmpp_2m", "steps": STEPS, "guidance_scale": 5.0, "width": 64, "height": 64},
    }
    style.update(changes)
    return style


def _identity(path: Path, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    vectors = normalise(rng.standard_normal((2, 512))).astype(np.float32)
    crop = rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)
    return save_identity(Identity(normalise(vectors.mean(axis=0)), vectors, crop), path)


@pytest.fixture(scope="module")
def pipeline(tiny_models, tmp_path_factory, one_torch_thread) -> PortraitPipeline:
    settings = {"sd15_path": str(tiny_models["sd15"]), "ip_adapter_path": str(tiny_models["ip_adapter_faceid_sd15"]),
                "arcface_path": str(tiny_models["arcface"]), "face_filter": False, "oversample": 1}
    portrait = PortraitPipeline()
    portrait.load(PipelineContext(models_dir=tmp_path_factory.mktemp("models"), settings=settings))
    return portrait


@pytest.fixture(scope="module")
def identities(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("users")
    return [_identity(root / name / "identity.npz", seed) for seed, name in enumerate("abc", start=1)]


def _job(out: Path, identity: Path, **changes: Any) -> dict[str, Any]:
    job = {"style": _style(), "identity": str(identity), "count": 1, "seed": 42, "out_dir": str(out)}
    job.update(changes)
    return job


def test_batched_jobs_of_different_users_match_their_pictures_alone(pipeline, identities, tmp_path):
    jobs = [  # three users: different identities, subjects, negative prompts, seeds and counts
        _job(tmp_path / "a", identities[0], count=2, seed=7),
        _job(tmp_path / "b", identities[1], seed=1234, subject="a woman"),
        _job(tmp_path / "c", identities[2], seed=99, style=_style(negative_prompt=None)),
    ]
    alone = [pipeline.run({**job, "out_dir": f"{job['out_dir']}-alone"}, StepRecorder()) for job in jobs]
    calls = ForwardCalls(pipeline.base("sd15").pipe)
    recorders = [StepRecorder() for _ in jobs]
    try:
        outcomes = pipeline.run_batch(list(zip(jobs, recorders, strict=True)))
    finally:
        calls.close()
    # One UNet call per step for all four candidates (classifier-free guidance doubles the rows).
    assert calls.unet == [2 * 4] * STEPS
    for solo, batched, recorder in zip(alone, outcomes, recorders, strict=True):
        assert isinstance(batched, JobResult)
        assert batched.meta["seeds"] == solo.meta["seeds"]
        for a, b in zip(result_pixels(solo), result_pixels(batched), strict=True):
            assert np.abs(a - b).max() <= 2
        assert [s for s, _ in recorder.steps] == list(range(1, STEPS + 2))  # each job's own progress
    # The pictures differ per job: per-sample identity and prompt, not one job's repeated.
    assert np.abs(result_pixels(outcomes[0])[0] - result_pixels(outcomes[1])[0]).max() > 2


def test_cancelled_job_is_dropped_and_a_failing_one_fails_alone(pipeline, identities, tmp_path):
    keep = _job(tmp_path / "keep", identities[0], seed=5)
    alone = pipeline.run({**keep, "out_dir": str(tmp_path / "alone")}, StepRecorder())
    cancelled = _job(tmp_path / "cancel", identities[1], seed=6)
    missing = _job(tmp_path / "missing", tmp_path / "nobody" / "identity.npz", seed=8)
    recorders = [StepRecorder(), StepRecorder(cancel_at=2), StepRecorder()]
    outcomes = pipeline.run_batch(list(zip([keep, cancelled, missing], recorders, strict=True)))
    assert isinstance(outcomes[0], JobResult)
    assert np.abs(result_pixels(outcomes[0])[0] - result_pixels(alone)[0]).max() <= 2
    assert isinstance(outcomes[1], JobCancelled)
    assert [s for s, _ in recorders[1].steps] == [1, 2]  # no step after its cancel
    assert not (tmp_path / "cancel").exists() or not any((tmp_path / "cancel").iterdir())
    assert isinstance(outcomes[2], UserFacingError) and outcomes[2].code == "portrait.no_identity"


def test_every_job_cancelled_stops_the_pass(pipeline, identities, tmp_path):
    calls = ForwardCalls(pipeline.base("sd15").pipe)
    try:
        outcomes = pipeline.run_batch([(_job(tmp_path / n, identities[i]), StepRecorder(cancel_at=1))
                                       for i, n in enumerate("xy")])
    finally:
        calls.close()
    assert all(isinstance(o, JobCancelled) for o in outcomes)
    assert len(calls.unet) == 1


def test_faceid_plus_batch_gives_each_job_its_own_face_crop(tiny_models, identities, tmp_path):
    settings = {"sd15_path": str(tiny_models["sd15"]), "arcface_path": str(tiny_models["arcface"]),
                "ip_adapter_path": str(tiny_models["ip_adapter_faceid_plus_sd15"]),
                "image_encoder_path": str(tiny_models["image_encoder"]), "face_filter": False, "oversample": 1}
    plus = PortraitPipeline()
    plus.load(PipelineContext(models_dir=tmp_path / "m", settings=settings))
    assert plus.base("sd15").plus
    try:
        jobs = [_job(tmp_path / "a", identities[0], seed=3), _job(tmp_path / "b", identities[1], seed=4)]
        alone = [plus.run({**job, "out_dir": f"{job['out_dir']}-alone"}, StepRecorder()) for job in jobs]
        batched = plus.run_batch([(job, StepRecorder()) for job in jobs])
    finally:
        plus.close()
    for solo, together in zip(alone, batched, strict=True):
        assert isinstance(together, JobResult)
        assert np.abs(result_pixels(solo)[0] - result_pixels(together)[0]).max() <= 2


def test_batch_plan_groups_what_a_pass_shares() -> None:
    settings = {"oversample": 2}
    base = _job(Path("/x"), Path("/a"))
    key, samples = batch_plan(base, settings)
    assert samples == 2
    assert batch_plan({**base, "identity": "/b", "seed": 3, "subject": "a man"}, settings)[0] == key
    assert batch_plan({**base, "count": 3}, settings)[1] == 6
    for other in ({"controls": {"likeness": "high"}}, {"style": _style(sampler={**_style()["sampler"], "steps": 9})},
                  {"user_lora": "/u/lora.safetensors"}, {"controls": {"aspect": "2:3"}}):
        assert batch_plan({**base, **other}, settings)[0] != key
    assert batch_plan({**base, "controls": {"pose": {"id": "arms-up"}}}, settings) is None
    assert batch_plan({**base, "controls": {"vary": {"seed": 1}}}, settings) is None
    # The operator's sampler cap applies to every style: two styles' steps become one.
    capped = {"sampler_override": {"steps": 4}}
    assert batch_plan({**base, "style": _style(sampler={**_style()["sampler"], "steps": 9})}, capped)[0] == \
        batch_plan(base, capped)[0]
