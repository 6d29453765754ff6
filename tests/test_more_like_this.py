""""More like this" draws new seeds, also where the operator fixed portrait_seed for /style."""
from __future__ import annotations

from facechain_core.styles import load_styles
from tests.fixtures.safety_world import event, make_world  # noqa: F401

USER = 5


async def test_more_like_this_draws_new_seeds_despite_a_fixed_one(make_world, tmp_path) -> None:  # noqa: F811
    from bot.storage import Artifact

    world = await make_world(portrait_seed=1234)
    world.services.styles = load_styles()
    world.services.features_installed = {"portrait"}
    key = f"telegram:{USER}"
    await world.storage.ensure_user(key, "telegram", "en")
    await world.storage.add_selfie(key, str(tmp_path / "s.jpg"), {"box": [0, 0, 1, 1]})
    await world.send(event(USER, "/style hanfu 1"))
    (first,) = await world.storage.user_jobs(key, ["queued"])
    assert first.params["seed"] == 1234  # /style keeps the operator's fixed seed
    artifact = Artifact("art1", first.id, key, "portrait", str(tmp_path / "p.png"), "image/png")
    await world.storage.finish_job(first.id, {"files": []}, [artifact])

    for _ in range(2):
        await world.send(event(USER, button="more:art1"))
    seeds = [j.params["seed"] for j in await world.storage.user_jobs(key, ["queued"])]
    assert len(seeds) == 2 and 1234 not in seeds and seeds[0] != seeds[1]
