"""Servers on Discord through the whole service and the real discord.py client against the fake
REST + gateway: each member is only themselves, server admins set a channel's rules, and a DM
result is posted to a channel the user picks where both may post ("Post to channel")."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bot.app import open_service
from bot.ops.logsetup import configure_logging
from handlers.chat_settings import chat_settings
from handlers.messages import t
from handlers.protocols import Chat
from tests.fixtures.fake_discord import (
    APP_ID,
    ATTACH_FILES,
    EPHEMERAL,
    INTERACTION_MEMBER_PERMISSIONS,
    MANAGE_GUILD,
    SEND_MESSAGES,
    ApiRequest,
    FakeDiscord,
    FakeInteraction,
    FakeUser,
    fake_discord,  # noqa: F401
)
from tests.test_groups_telegram import (
    IDENTITY,
    PORTRAIT,
    SLEEP_KIND,
    portrait_ready,  # noqa: F401
    render_command,  # noqa: F401
)

pytestmark = pytest.mark.timeout(90)

ANN, BOB = FakeUser(612000000000000001, "ann"), FakeUser(612000000000000002, "bob")
WEBHOOK = rf"/webhooks/{APP_ID}/[^/]+"
ADMIN = INTERACTION_MEMBER_PERMISSIONS | MANAGE_GUILD


@pytest.fixture
def settings(fake_discord: FakeDiscord, tmp_path: Path, yunet_path: Path) -> Any:  # noqa: F811
    settings = fake_discord.bot_settings(data_dir=tmp_path / "data", models_dir=yunet_path.parent, log_level="DEBUG",
                                         selfie={"detector_model": yunet_path.name},
                                         scheduler={"progress_interval_s": 0})
    configure_logging(settings)
    return settings


async def answer_of(fake: FakeDiscord, interaction: FakeInteraction, since: int) -> ApiRequest:
    """What filled a command's deferred response."""
    return await fake.wait_for("PATCH", WEBHOOK + "/messages/@original",
                               lambda r: interaction.token in r.path and r.content is not None, 15, since=since)


async def note_of(fake: FakeDiscord, press: FakeInteraction, since: int) -> ApiRequest:
    """The follow-up a button press got (its private note, or a message with buttons)."""
    return await fake.wait_for("POST", WEBHOOK, lambda r: press.token in r.path, 15, since=since)


async def dm_selfie(fake: FakeDiscord, user: FakeUser, photo: bytes) -> None:
    mark = fake.mark()
    answer = await answer_of(fake, fake.slash(user, "selfie", photo1=photo), mark)
    assert answer.content.startswith("Got it"), answer.content


async def jobs_of(service: Any, user: FakeUser) -> list[Any]:
    states = ["queued", "running", "done", "delivered", "failed", "cancelled"]
    return await service.storage.user_jobs(f"discord:{user.id}", states)


async def test_every_member_is_only_themselves(fake_discord: FakeDiscord, settings: Any, faces_dir: Path,  # noqa: F811
                                               portrait_ready: None) -> None:  # noqa: F811
    fake = fake_discord
    guild = fake.add_guild("Studio", members=[ANN, BOB])
    room = fake.guild_channel(int(guild["id"]), "portraits")
    posts = rf"/channels/{room['id']}/messages"
    face = (faces_dir / "obama.jpg").read_bytes()
    async with open_service(settings, extra_kinds=[PORTRAIT, IDENTITY]) as service:
        # A photo given to /selfie in a server is not kept: Ann is told, privately, to use the DM.
        mark = fake.mark()
        public = fake.slash(ANN, "selfie", channel=room, photo1=face)
        hint = await answer_of(fake, public, mark)
        assert hint.content == t("intake.group", "en", name="Ann")
        assert fake.interaction_responses(public)[0].flags & EPHEMERAL
        assert await service.storage.selfies(f"discord:{ANN.id}") == []
        # Bob has no selfies: /style in the server tells him to register; nothing runs on anyone's face.
        mark = fake.mark()
        refusal = await answer_of(fake, fake.slash(BOB, "style", channel=room, style="hanfu"), mark)
        assert refusal.content == t("portrait.need_selfie", "en")
        assert await jobs_of(service, BOB) == []

        await dm_selfie(fake, ANN, face)
        mark = fake.mark()
        fake.slash(ANN, "style", channel=room, style="hanfu", count=1)
        result = await fake.wait_for_files(posts, since=mark)
        (job,) = [j for j in await jobs_of(service, ANN) if j.kind == "portrait"]
        assert f"discord:{ANN.id}" in job.params["identity"]
        ids = result.custom_ids()
        more = next(c for c in ids if c.startswith("fc:more:"))
        share = next(c for c in ids if c.startswith("fc:share:"))

        # Bob pressing Ann's buttons is refused privately, and nothing runs or is posted for him.
        for custom_id in (more, share):
            mark = fake.mark()
            press = fake.press(BOB, result.response, custom_id)
            note = await note_of(fake, press, mark)
            assert note.content == t("button.not_yours", "en") and note.flags & EPHEMERAL
        await fake.wait_idle()
        assert await jobs_of(service, BOB) == []
        assert len(fake.find("POST", posts, since=mark)) == 0


async def test_server_admins_set_a_channels_rules(fake_discord: FakeDiscord, settings: Any,  # noqa: F811
                                                  render_command: None) -> None:  # noqa: F811
    fake = fake_discord
    guild = fake.add_guild("Studio", members=[ANN, BOB])
    room = fake.guild_channel(int(guild["id"]), "portraits")
    posts = rf"/channels/{room['id']}/messages"
    chat = Chat("discord", room["id"], False)
    async with open_service(settings, extra_kinds=[SLEEP_KIND]) as service:
        mark = fake.mark()
        asked = fake.slash(BOB, "settings", channel=room)
        refused = await answer_of(fake, asked, mark)
        assert refused.content == t("groups.admins_only", "en")
        assert fake.interaction_responses(asked)[0].flags & EPHEMERAL  # only Bob sees it

        # Ann may manage the server: the rules are posted in the channel with their buttons.
        mark = fake.mark()
        fake.slash(ANN, "settings", channel=room, member_permissions=ADMIN)
        panel = await fake.wait_for("POST", posts, lambda r: "fc:cset:safe" in r.custom_ids(), since=mark)
        mark = fake.mark()
        press = fake.press(BOB, panel.response, "fc:cset:safe")
        note = await note_of(fake, press, mark)
        assert note.content == t("groups.admins_only", "en") and note.flags & EPHEMERAL
        assert (await chat_settings(service.services, chat))["safe_mode"] is False

        for custom_id in ("fc:cset:safe", "fc:cset:limit.3"):
            mark = fake.mark()
            press = fake.press(ANN, panel.response, custom_id, member_permissions=ADMIN)
            edit = await fake.wait_for("PATCH", WEBHOOK + "/messages/@original",
                                       lambda r: press.token in r.path, since=mark)
        assert t("groups.safe_line", "en", state=t("groups.on", "en")) in edit.content
        assert await chat_settings(service.services, chat) == {"safe_mode": True, "daily_limit": 3,
                                                               "allowed_commands": None}
        # Bob's job in that channel runs under safe mode; in his DM it does not.
        for where in (room, None):
            mark = fake.mark()
            fake.slash(BOB, "render", channel=where)
            target = room["id"] if where else fake.dm_channel(BOB)["id"]
            await fake.wait_for_files(rf"/channels/{target}/messages", since=mark)
        in_room, in_dm = sorted(await jobs_of(service, BOB), key=lambda j: j.id)
        assert in_room.params["safe_mode"] is True and "safe_mode" not in in_dm.params
        await fake.wait_idle()


async def test_post_a_dm_result_to_a_channel(fake_discord: FakeDiscord, settings: Any, faces_dir: Path,  # noqa: F811
                                             portrait_ready: None) -> None:  # noqa: F811
    fake = fake_discord
    studio = fake.add_guild("Studio", members=[ANN, BOB])
    gid = int(studio["id"])
    open_room = fake.guild_channel(gid, "portraits")
    fake.guild_channel(gid, "announcements", overwrites=[fake.deny(gid, SEND_MESSAGES)])  # members can't post
    fake.guild_channel(gid, "text-only", overwrites=[fake.deny(APP_ID, ATTACH_FILES, member=True)])  # nor the bot files
    elsewhere = fake.add_guild("Elsewhere", members=[BOB])  # Ann is no member there
    fake.guild_channel(int(elsewhere["id"]), "general")
    async with open_service(settings, extra_kinds=[PORTRAIT, IDENTITY]) as service:
        await dm_selfie(fake, ANN, (faces_dir / "obama.jpg").read_bytes())
        dm_posts = rf"/channels/{fake.dm_channel(ANN)['id']}/messages"
        mark = fake.mark()
        fake.slash(ANN, "style", style="hanfu", count=1)
        result = await fake.wait_for_files(dm_posts, since=mark)
        await fake.wait_idle()
        (artifact,) = [a for j in await jobs_of(service, ANN) for a in await service.storage.job_artifacts(j.id)
                       if a.media_type.startswith("image/")]
        assert f"fc:share:{artifact.id}" in result.custom_ids()

        # Share offers only the channel where both Ann and the bot may post pictures.
        mark = fake.mark()
        press = fake.press(ANN, result.response, f"fc:share:{artifact.id}")
        picker = await note_of(fake, press, mark)
        assert picker.content == t("sharing.pick_channel", "en")
        post = f"fc:post:{artifact.id}.{open_room['id']}"
        assert picker.custom_ids() == [post]

        # Someone else's press of that choice posts nothing.
        mark = fake.mark()
        note = await note_of(fake, fake.press(BOB, picker.response, post), mark)
        assert note.content == t("button.not_yours", "en")
        assert fake.find("POST", rf"/channels/{open_room['id']}/messages") == []

        mark = fake.mark()
        press = fake.press(ANN, picker.response, post)
        posted = await fake.wait_for("POST", rf"/channels/{open_room['id']}/messages", since=mark, timeout=15)
        # The post carries the label and Report button of every result (not Ann's own buttons).
        assert posted.content.startswith(t("sharing.caption", "en", name="Ann")) and "AI-generated" in posted.content
        assert posted.custom_ids() == [f"fc:report:{artifact.id}"]
        assert [data for _, data in posted.files] == [Path(artifact.path).read_bytes()]
        done = await fake.wait_for("PATCH", WEBHOOK + "/messages/@original", lambda r: press.token in r.path,
                                   since=mark)
        assert done.content == t("sharing.posted", "en", channel="#portraits (Studio)") and done.custom_ids() == []
        await fake.wait_idle()
    assert [r.path for r in fake.requests if r.method == "POST" and r.path.startswith("/channels/") and r.files
            and r.path != dm_posts] == [rf"/channels/{open_room['id']}/messages"]


async def test_a_report_reaches_the_admin_in_their_dm(fake_discord: FakeDiscord, tmp_path: Path,  # noqa: F811
                                                      yunet_path: Path, faces_dir: Path,
                                                      portrait_ready: None) -> None:  # noqa: F811
    fake = fake_discord
    cat = FakeUser(612000000000000003, "cat")
    settings = fake.bot_settings(data_dir=tmp_path / "data", models_dir=yunet_path.parent,
                                 selfie={"detector_model": yunet_path.name}, scheduler={"progress_interval_s": 0},
                                 access={"admins": [f"discord:{cat.id}"]})
    guild = fake.add_guild("Studio", members=[ANN, BOB])
    room = fake.guild_channel(int(guild["id"]), "portraits")
    async with open_service(settings, extra_kinds=[PORTRAIT, IDENTITY]):
        await dm_selfie(fake, ANN, (faces_dir / "obama.jpg").read_bytes())
        mark = fake.mark()
        fake.slash(ANN, "style", channel=room, style="hanfu", count=1)
        result = await fake.wait_for_files(rf"/channels/{room['id']}/messages", since=mark)
        report = next(c for c in result.custom_ids() if c.startswith("fc:report:"))
        mark = fake.mark()
        note = await note_of(fake, fake.press(BOB, result.response, report), mark)
        assert note.content == t("safety.reported", "en")
        # The admin's DM has its own id on Discord: the bot opens it and sends the picture there.
        dm = fake.dm_channel(cat)
        assert dm["id"] != str(cat.id)
        notice = await fake.wait_for_files(rf"/channels/{dm['id']}/messages", timeout=15, since=mark)
        assert f"discord:{ANN.id}" in notice.content and f"discord:{BOB.id}" in notice.content
        assert any(c.startswith("fc:rban:") for c in notice.custom_ids())
