"""The whole service on the Ray backend: a Telegram photo and /cartoon, through storage, the scheduler, a worker
actor on another "node" of tests/fixtures/ray_cluster.py and back, against the fake Bot API."""
from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

from bot.app import open_service
from facechain_core.tiny.cartoon import build_cartoon_models
from tests.fixtures.fake_telegram import FakeTelegram
from tests.fixtures.ray_cluster import GPU, NAMESPACE, RayWorld

pytestmark = pytest.mark.timeout(180)
ANN = 424242


@pytest.fixture(scope="module")
def cartoon_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_cartoon_models(tmp_path_factory.mktemp("tiny_cartoon"))


async def test_a_cartoon_is_made_on_a_ray_worker_and_sent(fake_telegram: FakeTelegram, tmp_path: Path,
                                                          yunet_path: Path, faces_dir: Path, ray_world: RayWorld,
                                                          cartoon_models: dict[str, Path]) -> None:
    fake = fake_telegram
    settings = fake.bot_settings(
        data_dir=tmp_path / "data", models_dir=yunet_path.parent, selfie={"detector_model": yunet_path.name},
        model_paths=cartoon_models, scheduler={
            "progress_interval_s": 0, "backend": "ray", "ray_gpu_resource": GPU, "ray_namespace": NAMESPACE,
            "ray_node_labels": {"tier": "big"}},  # the node that is not the bot's
    )
    image = Image.open(faces_dir / "obama.jpg").convert("RGB")
    buf = io.BytesIO()
    image.resize((image.width // 2, image.height // 2)).save(buf, "JPEG", quality=92)
    async with open_service(settings) as service:
        mark = fake.mark()
        photo = fake.send_photo(ANN, None, buf.getvalue())
        await fake.wait_for("sendMessage", since=mark, timeout=15)
        mark = fake.mark()
        fake.send_message(ANN, None, "/cartoon anime", reply_to_message=photo)
        sent = await fake.wait_for("sendPhoto", since=mark, timeout=60)
        await fake.wait_idle()
        (job,) = [j for j in await service.storage.user_jobs(f"telegram:{ANN}", ["delivered"]) if j.kind == "cartoon"]
        worker_states = service.scheduler.health()["worker_states"]
    (picture,) = fake.uploads(sent)
    assert Image.open(io.BytesIO(picture)).size == (image.width // 2, image.height // 2)
    assert job.result["meta"]["node"] == ray_world.big_id and job.result["meta"]["actor"].startswith("facechain-worker")
    assert [w["node"] for w in worker_states] == [ray_world.big_id]
    data = str((tmp_path / "data").resolve())
    assert all(path.startswith(data) for path in job.result["files"])  # written back under data_dir
