"""Cross-user batching of try-on and template jobs on tiny models: the UNet and both ControlNets run once per
step for the whole batch (each sample with its own picture, mask, control pictures, prompt, identity and seed),
and each job gets the pictures it gets alone."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from bot.config import SchedulerSettings
from bot.engine.jobkinds import GENERATE, JobKind, JobKinds
from bot.engine.scheduler import Scheduler
from bot.ops.metrics import JobMetrics
from bot.storage import JobState, Storage
from facechain_core.errors import JobCancelled, UserFacingError
from facechain_core.identity import Identity, normalise, save_identity
from facechain_core.inpaint_batch import template_batch_plan, tryon_batch_plan, working_size
from facechain_core.pipeline import JobResult, PipelineContext
from facechain_core.pose import Pose, PoseEstimator, draw_openpose, openpose_body
from facechain_core.template import TemplatePipeline
from facechain_core.tiny.tryon import PALETTE, build_tryon_models, draw_outfit
from facechain_core.tryon import TryOnPipeline, working_image
from tests.conftest import SHARED, find_asset
from tests.fixtures.batch_pass import ForwardCalls, result_pixels
from tests.fixtures.progress import StepRecorder
from tests.test_batching import blocked
from tests.test_scheduler import CHAT, PIPELINE, RecordingSink, in_state, storage, until  # noqa: F401
from tests.fixtures.tiny_models import one_torch_thread, tiny_models, tiny_models_dir  # noqa: F401

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

SIDE = 64
STEPS = 3


@pytest.fixture(scope="module")
def model_paths(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory,  # noqa: F811
                one_torch_thread: None) -> dict[str, str]:  # noqa: F811
    built = build_tryon_models(tmp_path_factory.mktemp("tiny_tryon"))
    return {**{name: str(path) for name, path in built.items()},
            "ip-adapter-faceid-sd15": str(tiny_models["ip_adapter_faceid_sd15"]),
            "arcface": str(tiny_models["arcface"]), "yunet": str(find_asset("models/yunet_s_640_640.onnx"))}


def _settings(model_paths: dict[str, str]) -> dict[str, Any]:
    table = {"side": SIDE, "steps": STEPS}
    return {"face_filter": False, "oversample": 1, "model_paths": model_paths, "tryon": table, "template": table}


def _load(pipeline: Any, model_paths: dict[str, str], root: Path) -> Any:
    pipeline.load(PipelineContext(models_dir=root, settings=_settings(model_paths)))
    return pipeline


@pytest.fixture(scope="module")
def tryon(model_paths: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Any:
    pipeline = _load(TryOnPipeline(), model_paths, tmp_path_factory.mktemp("tryon"))
    yield pipeline
    pipeline.close()


@pytest.fixture(scope="module")
def template(model_paths: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Any:
    pipeline = _load(TemplatePipeline(), model_paths, tmp_path_factory.mktemp("template"))
    yield pipeline
    pipeline.close()


@pytest.fixture(scope="module")
def identities(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("users")
    paths = []
    for seed, name in enumerate("abc", start=1):
        rng = np.random.default_rng(seed)
        vectors = normalise(rng.standard_normal((2, 512))).astype(np.float32)
        crop = rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)
        paths.append(save_identity(Identity(normalise(vectors.mean(axis=0)), vectors, crop), root / name / "id.npz"))
    return paths


def _outfit(tmp: Path, seed: int, **drawing: Any) -> Path:
    path = tmp / f"outfit{seed}.png"
    Image.fromarray(draw_outfit(128, seed=seed, **drawing)).save(path)
    return path


def _batched(pipeline: Any, jobs: list[dict[str, Any]], recorders: list[StepRecorder]) -> tuple[list[Any], Any]:
    calls = ForwardCalls(pipeline.base().pipe)
    try:
        return pipeline.run_batch(list(zip(jobs, recorders, strict=True))), calls
    finally:
        calls.close()


def _alone(pipeline: Any, jobs: list[dict[str, Any]]) -> tuple[list[JobResult], list[StepRecorder], int]:
    """Each job run by itself: its result, its progress, and the UNet calls of one pass (the sampler's steps)."""
    recorders = [StepRecorder() for _ in jobs]
    calls = ForwardCalls(pipeline.base().pipe)
    try:
        results = [pipeline.run({**job, "out_dir": job["out_dir"] + "-alone"}, recorder)
                   for job, recorder in zip(jobs, recorders, strict=True)]
    finally:
        calls.close()
    return results, recorders, len(calls.unet) // len(jobs)


def _assert_as_alone(alone: list[JobResult], batched: list[Any]) -> None:
    for solo, together in zip(alone, batched, strict=True):
        assert isinstance(together, JobResult), together
        assert together.meta["seeds"] == solo.meta["seeds"]
        assert len(together.files) == len(solo.files)
        for a, b in zip(result_pixels(solo), result_pixels(together), strict=True):
            assert np.abs(a - b).max() <= 2


def test_tryon_jobs_of_different_users_share_one_pass_and_get_their_pictures_alone(tryon, identities, tmp_path):
    moved = tmp_path / "pose.png"  # one user brings their own pose picture
    body = openpose_body(PoseEstimator(tryon._model("pose_path")).estimate(
        working_image(_outfit(tmp_path, 3), SIDE), (16.0, 0.0, 48.0, 64.0)))
    Image.fromarray(draw_openpose(Pose(body.keypoints + np.float32(9.0), body.scores), (SIDE, SIDE))).save(moved)
    jobs = [  # three users: their own outfit photos, identities, seeds, counts, prompt and pose
        {"outfit": str(_outfit(tmp_path, 1, arm_angle=0.3)), "identity": str(identities[0]), "seed": 7, "count": 2},
        {"outfit": str(_outfit(tmp_path, 2)), "identity": str(identities[1]), "seed": 1234, "prompt": "a red hat"},
        {"outfit": str(_outfit(tmp_path, 3)), "identity": str(identities[2]), "seed": 99, "pose_image": str(moved)},
    ]
    for n, job in enumerate(jobs):
        job["out_dir"] = str(tmp_path / f"job{n}")
    alone, alone_steps, per_pass = _alone(tryon, jobs)
    assert per_pass >= STEPS
    recorders = [StepRecorder() for _ in jobs]
    outcomes, calls = _batched(tryon, jobs, recorders)
    # One UNet call and one call of each ControlNet per step, for all four samples (guidance doubles the rows).
    assert calls.unet == [2 * 4] * per_pass
    assert calls.controlnets == [[2 * 4] * per_pass] * 2
    _assert_as_alone(alone, outcomes)
    for recorder, solo in zip(recorders, alone_steps, strict=True):
        assert recorder.steps == solo.steps  # each job's own progress
    # Each job got its own outfit and identity, not one job's repeated.
    assert np.abs(result_pixels(outcomes[0])[0] - result_pixels(outcomes[1])[0]).max() > 2
    assert outcomes[0].meta["safety"] == {"checked": 0, "dropped": 0}  # screened per job, like portraits


@pytest.mark.timeout(300)
async def test_the_scheduler_sends_two_users_tryons_to_the_worker_as_one_pass(
        storage: Storage, tryon, model_paths, identities, tmp_path) -> None:  # noqa: F811
    kinds = JobKinds(())
    kinds.register(JobKinds()["tryon"])  # the real kind: its pipeline and its batch plan
    kinds.register(JobKind("quick", PIPELINE, GENERATE, max_tries=2, timeout_s=30))  # the blocker
    metrics, sink = JobMetrics(), RecordingSink()
    scheduler = Scheduler(storage, kinds, SchedulerSettings(batch_max=8), data_dir=tmp_path / "data",
                          context={"models_dir": str(tmp_path), "settings": _settings(model_paths)}, sink=sink,
                          on_event=metrics.observe)
    jobs = [{"outfit": str(_outfit(tmp_path, 20 + n)), "identity": str(identities[n]), "seed": 30 + n, "count": 1,
             "picture_size": [128, 128]} for n in range(2)]
    await scheduler.start()
    try:
        async with blocked(scheduler, tmp_path):
            ids = [(await scheduler.submit(f"u:{n}", "tryon", job, CHAT)).job_id for n, job in enumerate(jobs)]
        await until(in_state(storage, ids, JobState.DELIVERED), 240)
    finally:
        await scheduler.stop(grace_s=0)
    sample = metrics.registry.get_sample_value
    assert sample("facechain_batch_size_count", {"kind": "tryon"}) == 1  # one pass for both users
    assert sample("facechain_batch_size_sum", {"kind": "tryon"}) == 2
    for job_id, job in zip(ids, jobs, strict=True):
        row = await storage.job(job_id)
        alone = tryon.run({**job, "out_dir": str(tmp_path / f"alone{job_id}")}, StepRecorder())
        (artifact,) = sink.delivered[job_id]
        assert artifact.owner_key == row.user_key and row.attempts == 1
        with Image.open(artifact.path) as img:
            delivered = np.asarray(img.convert("RGB"), dtype=np.int16)
        assert np.abs(delivered - result_pixels(alone)[0]).max() <= 2


def test_a_cancelled_tryon_is_dropped_and_a_failing_one_fails_alone(tryon, identities, tmp_path):
    keep = {"outfit": str(_outfit(tmp_path, 4)), "identity": str(identities[0]), "seed": 5,
            "out_dir": str(tmp_path / "keep")}
    alone, _, per_pass = _alone(tryon, [keep])
    cancelled = {**keep, "identity": str(identities[1]), "seed": 6, "out_dir": str(tmp_path / "cancel")}
    nobody = {**keep, "identity": str(tmp_path / "nobody" / "id.npz"), "out_dir": str(tmp_path / "nobody")}
    bare = tmp_path / "bare.png"  # no garment on it: the parser refuses it
    Image.fromarray(np.full((128, 128, 3), PALETTE["background"][0], np.uint8)).save(bare)
    no_person = {**keep, "outfit": str(bare), "out_dir": str(tmp_path / "bare")}
    recorders = [StepRecorder(), StepRecorder(cancel_at=2), StepRecorder(), StepRecorder()]
    outcomes, calls = _batched(tryon, [keep, cancelled, nobody, no_person], recorders)
    _assert_as_alone(alone, outcomes[:1])
    assert isinstance(outcomes[1], JobCancelled)
    assert [s for s, _ in recorders[1].steps] == [1, 2]  # no step after its cancel
    assert not any((tmp_path / "cancel").glob("*.png"))
    assert isinstance(outcomes[2], UserFacingError) and outcomes[2].code == "portrait.no_identity"
    assert isinstance(outcomes[3], UserFacingError) and outcomes[3].code == "tryon.no_person"
    assert calls.unet == [2 * 2] * per_pass  # the two jobs that got to denoise shared the pass


def test_faceid_plus_tryon_batch_gives_each_sample_its_own_face_crop(model_paths, tiny_models, tmp_path):  # noqa: F811
    plus = TryOnPipeline()
    plus.load(PipelineContext(models_dir=tmp_path, settings={
        "face_filter": False, "oversample": 1, "image_encoder_path": str(tiny_models["image_encoder"]),
        "model_paths": {**model_paths, "ip-adapter-faceid-sd15": str(tiny_models["ip_adapter_faceid_plus_sd15"])},
        "tryon": {"side": SIDE, "steps": STEPS, "identity_weight": 10.0}}))  # the tiny CLIP path is faint at 1.0
    try:
        assert plus.base().plus
        embedding = normalise(np.random.default_rng(4).standard_normal(512)).astype(np.float32)
        outfit = _outfit(tmp_path, 10)
        jobs = []
        for n in range(2):  # one embedding, two face crops: only the crop tells the samples apart
            crop = np.random.default_rng(n).integers(0, 256, (224, 224, 3), dtype=np.uint8)
            identity = save_identity(Identity(embedding, embedding[None], crop), tmp_path / f"id{n}.npz")
            jobs.append({"outfit": str(outfit), "identity": str(identity), "seed": 8,
                         "out_dir": str(tmp_path / str(n))})
        alone, _, per_pass = _alone(plus, jobs)
        outcomes, calls = _batched(plus, jobs, [StepRecorder(), StepRecorder()])
    finally:
        plus.close()
    assert calls.unet == [2 * 2] * per_pass
    _assert_as_alone(alone, outcomes)
    assert np.abs(result_pixels(outcomes[0])[0] - result_pixels(outcomes[1])[0]).max() > 2


def _template_picture(tmp: Path, name: str) -> Path:
    source = SHARED / "faces" / name
    if not source.is_file():
        pytest.skip(f"{source} not present (a fresh clone has no ../shared/)")
    with Image.open(source) as img:
        picture = img.convert("RGB").resize((192, 192))
    path = tmp / f"template-{name}.png"
    picture.save(path)
    return path


def test_template_jobs_of_different_users_share_one_pass_and_get_their_pictures_alone(template, identities,
                                                                                      tmp_path, monkeypatch):
    # The tiny DWPose's random weights decide whether a template shows a body: one template is made to show none,
    # so its openpose ControlNet weighs 0 for its samples while the others' weigh 1.
    without_pose = working_image(_template_picture(tmp_path, "biden.jpg"), SIDE)
    with_pose = template._pose_control
    monkeypatch.setattr(template, "_pose_control", lambda picture: (
        (Image.fromarray(np.zeros_like(picture)), 0.0) if np.array_equal(picture, without_pose)
        else with_pose(picture)))
    jobs = [  # two templates of one size, three users with their own identities, seeds, subjects and hints
        {"template": str(_template_picture(tmp_path, "obama.jpg")), "template_id": "a", "identity": str(identities[0]),
         "seed": 11, "count": 2},
        {"template": str(_template_picture(tmp_path, "biden.jpg")), "template_id": "b", "identity": str(identities[1]),
         "seed": 12, "hints": "oil painting", "subject": "a woman"},
        {"template": str(_template_picture(tmp_path, "obama.jpg")), "template_id": "a", "identity": str(identities[2]),
         "seed": 13},
    ]
    for n, job in enumerate(jobs):
        job["out_dir"] = str(tmp_path / f"job{n}")
    alone, alone_steps, per_pass = _alone(template, jobs)
    assert [r.meta["pose_found"] for r in alone] == [True, False, True]  # each sample weighs its own pose
    recorders = [StepRecorder() for _ in jobs]
    outcomes, calls = _batched(template, jobs, recorders)
    assert calls.unet == [2 * 4] * per_pass
    _assert_as_alone(alone, outcomes)
    for solo, together in zip(alone, outcomes, strict=True):
        assert together.meta["mask_box"] == solo.meta["mask_box"] and together.meta["template"] == solo.meta["template"]
    for recorder, solo in zip(recorders, alone_steps, strict=True):
        assert recorder.steps == solo.steps
    # One template, two identities: two pictures.
    assert np.abs(result_pixels(outcomes[0])[0] - result_pixels(outcomes[2])[0]).max() > 2


def test_template_jobs_a_pass_cannot_share_run_apart_each_as_alone(template, identities, tmp_path):
    """The scheduler plans from params; what only the worker learns (no face, a likeness the plan did not see)
    still comes out right: a bad job fails alone, jobs of another identity weight or a Vary get their own pass."""
    picture = _template_picture(tmp_path, "obama.jpg")
    faceless = tmp_path / "faceless.png"
    Image.fromarray(np.full((192, 192, 3), 120, np.uint8)).save(faceless)
    good = {"template": str(picture), "identity": str(identities[0]), "seed": 21, "out_dir": str(tmp_path / "good")}
    vary = {**good, "identity": str(identities[1]), "controls": {"vary": {"seed": 21}}, "out_dir": str(tmp_path / "v")}
    high = {**good, "identity": str(identities[2]), "controls": {"likeness": "high"}, "out_dir": str(tmp_path / "h")}
    jobs = [good, {**good, "template": str(faceless)}, vary, high]
    alone, _, per_pass = _alone(template, [good, vary, high])
    outcomes, calls = _batched(template, jobs, [StepRecorder() for _ in jobs])
    assert isinstance(outcomes[1], UserFacingError) and outcomes[1].code == "template.no_face"
    _assert_as_alone(alone, [outcomes[0], outcomes[2], outcomes[3]])
    assert outcomes[2].meta["vary_of"] == 21 and outcomes[3].meta["identity_weight"] == 1.3
    assert calls.unet == [2 * 1] * (3 * per_pass)  # three passes of one sample each


def test_plans_group_what_a_pass_shares() -> None:
    settings = {"oversample": 2, "tryon": {"side": 512}}
    tryon = {"outfit": "/o.jpg", "identity": "/a", "count": 1, "seed": 1, "picture_size": [900, 1200]}
    key, samples = tryon_batch_plan(tryon, settings)
    assert samples == 2 and tryon_batch_plan({**tryon, "count": 3}, settings)[1] == 6
    # Another user, photo and seed of the same working size (384x512): the same pass.
    assert tryon_batch_plan({**tryon, "identity": "/b", "seed": 9, "picture_size": [600, 800]}, settings)[0] == key
    for other in ({"picture_size": [1200, 900]}, {"fast": True}, {"user_lora": "/u/lora.safetensors"}):
        assert tryon_batch_plan({**tryon, **other}, settings)[0] != key
    assert tryon_batch_plan({**tryon, "picture_size": None}, settings) is None  # queued before sizes were stored
    assert tryon_batch_plan({**tryon, "low_memory": True}, settings) is None
    template = {"template": "/t.jpg", "identity": "/a", "count": 1, "picture_size": [512, 512], "controls": {}}
    key = template_batch_plan(template, {})[0]
    assert template_batch_plan({**template, "controls": {"likeness": "normal"}}, {})[0] == key
    assert template_batch_plan({**template, "controls": {"likeness": "high"}}, {})[0] != key
    assert template_batch_plan({**template, "controls": {"vary": {"seed": 3}}}, {}) is None
    assert template_batch_plan({**template, "picture_size": ["x", 2]}, {}) is None


def test_working_size_is_the_pictures_own(tmp_path: Path) -> None:
    for size in ((128, 128), (900, 1200), (1200, 700), (64, 300)):
        path = tmp_path / f"{size[0]}x{size[1]}.png"
        Image.new("RGB", size).save(path)
        height, width = working_image(path, 512).shape[:2]
        assert working_size(*size, 512) == (width, height)
    with pytest.raises(ValueError):
        working_size(100, 100, 32)
