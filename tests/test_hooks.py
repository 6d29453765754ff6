"""The hooks features add to every job: admission checks run by stage and give back what they took on a
refusal or a failed submission; decorations add to results; with nothing registered jobs run plainly."""
from __future__ import annotations

from typing import Any

import pytest

from bot.storage import Artifact, new_artifact_id
from facechain_core.errors import UserFacingError
from handlers import buttons, chat_settings, hooks
from handlers.messages import t
from handlers.progress import present_default, submit_staged, submit_with_progress
from handlers.protocols import Chat
from tests.fixtures.safety_world import event, make_world, private  # noqa: F401

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def no_hooks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Empties the registries for one test, as in a process that never imported the features."""
    monkeypatch.setattr(hooks, "_admission_checks", [])
    monkeypatch.setattr(hooks, "_caption_decorators", [])
    monkeypatch.setattr(hooks, "_keyboard_decorators", [])


async def test_checks_run_by_stage_and_a_refusal_gives_back_what_earlier_ones_took(no_hooks) -> None:  # noqa: ANN001
    calls: list[str] = []

    async def chat_rule(services: Any, ev: Any, kind: str, params: dict[str, Any]) -> hooks.Admission:
        calls.append("chat")

        async def give_back() -> None:
            calls.append("chat given back")

        return hooks.Admission({**params, "safe_mode": True}, give_back)

    async def user_limit(services: Any, ev: Any, kind: str, params: dict[str, Any]) -> None:
        calls.append(f"user {sorted(params)}")

    async def refuse(services: Any, ev: Any, kind: str, params: dict[str, Any]) -> None:
        calls.append(f"refuse {sorted(params)}")
        raise UserFacingError("quota.exceeded")

    hooks.register_admission_check(chat_rule, hooks.AdmissionStage.CHAT)
    hooks.register_admission_check(user_limit, hooks.AdmissionStage.USER)
    hooks.register_admission_check(user_limit, hooks.AdmissionStage.USER)  # once only
    params, undo = await hooks.admit(None, event(1), "demo", {"style": "x"})  # type: ignore[arg-type]
    assert params == {"style": "x", "safe_mode": True}
    assert calls == ["user ['style']", "chat"]
    await undo()
    assert calls[-1] == "chat given back"

    calls.clear()
    hooks.register_admission_check(refuse, hooks.AdmissionStage.CHAT)
    with pytest.raises(UserFacingError):
        await hooks.admit(None, event(1), "demo", {})  # type: ignore[arg-type]
    assert calls == ["user []", "chat", "refuse ['safe_mode']", "chat given back"]


async def test_a_failed_submission_gives_back_what_the_checks_took(make_world, no_hooks) -> None:  # noqa: ANN001, F811
    world = await make_world()
    given_back: list[str] = []

    async def taker(services: Any, ev: Any, kind: str, params: dict[str, Any]) -> hooks.Admission:
        async def give_back() -> None:
            given_back.append(kind)

        return hooks.Admission(params, give_back)

    async def broken_submit(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("queue down")

    hooks.register_admission_check(taker, hooks.AdmissionStage.CHAT)
    world.jobs.submit = broken_submit  # type: ignore[method-assign]
    with pytest.raises(RuntimeError):
        await submit_with_progress(world.services, event(1), world.channel(private(1)), "demo", {})
    assert given_back == ["demo"]


async def test_a_refused_staged_job_leaves_no_inputs_and_a_queued_one_keeps_them(make_world) -> None:  # noqa: ANN001
    world = await make_world(quotas={"demo": 1})
    folders = [world.services.user_dir("telegram:1") / "demo" / name for name in ("first", "second")]
    for folder in folders:
        folder.mkdir(parents=True)
        (folder / "input.jpg").write_bytes(b"staged")
    await submit_staged(world.services, event(1), world.channel(private(1)), "demo", {}, folders[0])
    with pytest.raises(UserFacingError) as refused:
        await submit_staged(world.services, event(1), world.channel(private(1)), "demo", {}, folders[1])
    assert refused.value.code == "quota.exceeded"
    assert (folders[0] / "input.jpg").is_file() and not folders[1].exists()


async def test_without_features_jobs_run_plainly(make_world, no_hooks) -> None:  # noqa: ANN001, F811
    world = await make_world(quotas={"demo": 1})
    key, chat = "telegram:1", private(1)
    for _ in range(2):  # no quota check registered: both admitted
        await submit_with_progress(world.services, event(1), world.channel(chat), "demo", {})
    jobs = await world.storage.user_jobs(key, ("queued",))
    assert len(jobs) == 2 and all(job.params == {} for job in jobs)

    arts = [Artifact(new_artifact_id(), jobs[0].id, key, "demo", f"/x/{i}.png", "image/png") for i in range(2)]
    await world.storage.finish_job(jobs[0].id, {"meta": {"safety": {"dropped": 3}}}, arts)
    job = await world.storage.job(jobs[0].id)
    channel = world.channel(chat)
    await present_default(world.services, job, await world.storage.job_artifacts(job.id), channel, "en")
    (_, caption, keyboard), = channel.images
    assert caption == t("result.caption", "en")
    assert keyboard == buttons.result_keyboard(arts, "en")


async def test_the_users_quota_is_checked_before_the_groups_rules(make_world) -> None:  # noqa: ANN001, F811
    world = await make_world(quotas={"demo": 1})
    user_key, group, day = "telegram:1", Chat("telegram", "-100", False), chat_settings._today()
    await world.storage.set_chat_settings(group.key, {"daily_limit": 1})
    assert await world.storage.take_chat_quota(group.key, user_key, day, 1)  # the group's share used up too
    await world.jobs.submit(user_key, "demo", {}, private(1))  # today's one job, started privately
    with pytest.raises(UserFacingError) as refused:
        await submit_with_progress(world.services, event(1, chat=group), world.channel(group), "demo", {})
    assert refused.value.code == "quota.exceeded"  # the user's own limit speaks first
    assert await world.storage.take_chat_quota(group.key, user_key, day, 2)  # one share taken, not two


def test_owner_only_buttons_stay_off_results_shown_to_others(no_hooks) -> None:  # noqa: ANN001
    from handlers.protocols import Button

    def everyone(services: Any, job: Any, keyboard: Any, artifacts: list[Any], lang: str) -> Any:
        return (keyboard or []) + [[Button("Report", "report:a")]]

    def owner(services: Any, job: Any, keyboard: Any, artifacts: list[Any], lang: str) -> Any:
        return (keyboard or []) + [[Button("Options", "optres:a")]]

    hooks.register_keyboard_decorator(everyone)
    hooks.register_keyboard_decorator(owner, owner_only=True)
    hooks.register_keyboard_decorator(owner, owner_only=True)  # once only
    _, mine = hooks.decorate_result(None, None, "c", [], "en")  # type: ignore[arg-type]
    _, shared = hooks.decorate_result(None, None, "c", [], "en", owner_buttons=False)  # type: ignore[arg-type]
    assert [b.payload for row in mine for b in row] == ["report:a", "optres:a"]
    assert [b.payload for row in shared for b in row] == ["report:a"]
