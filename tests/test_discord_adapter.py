"""The Discord adapter with the real discord.py client against the fake REST + gateway server.

Every check reads the HTTP requests the fake received; the dispatch stands in for the router.
"""
from __future__ import annotations

import asyncio
import io
from pathlib import Path
from types import SimpleNamespace

import discord
import numpy as np
import pytest
from PIL import Image
from skimage import data as skdata

from bot.platforms.discord_adapter import DiscordAdapter
from bot.platforms.discord_channel import fit_image, keyboards, pack_files
from facechain_core.cartoon import load_cartoon_styles
from facechain_core.styles import load_styles
from handlers import router
from handlers.messages import t
from handlers.talk import MAX_TEXT_CHARS
from handlers.protocols import Button, Event, Media, MessageRef, ReplyChannel, Visibility
from tests.fixtures.fake_discord import (
    APP_ID,
    EPHEMERAL,
    INTERACTION_DEADLINE_S,
    FakeDiscord,
    FakeInteraction,
    FakeUser,
    fake_discord,  # noqa: F401
)
from tests.fixtures.recorder import Recorder

pytestmark = pytest.mark.timeout(60)

USER = 412345678901234567
OTHER = 498765432109876543
GUILD = 300000000000000001
WEBHOOK = rf"/webhooks/{APP_ID}/[^/]+"


def adapter_for(fake: FakeDiscord, dispatch: Recorder, *, features: set[str] | None = None,
                **discord: object) -> DiscordAdapter:
    """An adapter with a recording dispatch; with `features`, it also knows the styles catalogue."""
    services = SimpleNamespace(styles=load_styles(), features_installed=features) if features is not None else None
    return DiscordAdapter(fake.bot_settings(discord=discord), services, dispatch=dispatch)  # type: ignore[arg-type]


def photo(size: int = 256) -> bytes:
    out = io.BytesIO()
    Image.fromarray(skdata.astronaut()).resize((size, size)).save(out, format="JPEG")
    return out.getvalue()


async def settle(fake: FakeDiscord, recorder: Recorder, count: int = 1) -> list[Event]:
    events = await recorder.wait(count)
    await fake.wait_idle(0.2)
    assert not recorder.errors, recorder.errors
    return events


# -- commands -------------------------------------------------------------------------------------
async def test_commands_are_synced_with_descriptions_and_typed_options(fake_discord: FakeDiscord) -> None:
    async with adapter_for(fake_discord, Recorder()):
        (sync,) = fake_discord.find("PUT", rf"/applications/{APP_ID}/commands")
    commands = {c["name"]: c for c in sync.json}
    assert list(commands) == [c.name for c in router.commands()] + ["selfie"]
    for command in sync.json:
        assert 1 <= len(command["description"]) <= 100
    assert commands["help"]["description"] == t("help.help", "en")
    assert commands["help"]["description_localizations"]["zh-CN"] == t("help.help", "zh")
    style = {o["name"]: o for o in commands["style"]["options"]}
    assert style["style"]["type"] == 3 and style["style"]["required"] and style["style"]["autocomplete"]
    assert style["count"]["type"] == 4 and not style["count"].get("required")
    assert (style["count"]["min_value"], style["count"]["max_value"]) == (1, 8)
    photos = commands["selfie"]["options"]
    assert [o["name"] for o in photos] == [f"photo{i}" for i in range(1, 6)]
    assert all(o["type"] == 11 for o in photos)
    assert [bool(o.get("required")) for o in photos] == [True, False, False, False, False]
    assert commands["status"]["options"] == []


async def test_later_features_sync_typed_options(fake_discord: FakeDiscord) -> None:
    async with adapter_for(fake_discord, Recorder()):
        (sync,) = fake_discord.find("PUT", rf"/applications/{APP_ID}/commands")
    commands = {c["name"]: c for c in sync.json}

    def options(name: str) -> dict[str, dict]:
        found = commands[name]["options"]
        assert all(1 <= len(o["description"]) <= 100 for o in found)
        return {o["name"]: o for o in found}

    cartoon = options("cartoon")
    assert list(cartoon) == ["style", "photo"]
    assert cartoon["style"]["type"] == 3 and cartoon["style"]["autocomplete"] and not cartoon["style"].get("required")
    assert cartoon["style"]["description"] == t("discord.option_cartoon_style", "en")
    assert cartoon["style"]["description_localizations"]["zh-CN"] == t("discord.option_cartoon_style", "zh")
    assert cartoon["photo"]["type"] == 11 and not cartoon["photo"].get("required")
    talk = options("talk")
    assert list(talk) == ["text", "round", "photo"]
    assert talk["text"]["type"] == 3 and talk["text"]["max_length"] == MAX_TEXT_CHARS and not talk["text"].get("required")
    assert talk["round"]["type"] == 5 and talk["photo"]["type"] == 11
    assert not any(o.get("required") for o in talk.values())
    tryon = options("tryon")
    assert list(tryon) == ["outfit"] and tryon["outfit"]["type"] == 11 and not tryon["outfit"].get("required")
    admin = options("admin")
    assert list(admin) == ["action", "user", "reason"] and admin["action"]["required"]
    assert [c["value"] for c in admin["action"]["choices"]] == ["stats", "ban", "unban", "bans"]
    assert admin["user"]["type"] == admin["reason"]["type"] == 3
    assert int(commands["admin"]["default_member_permissions"]) == discord.Permissions(administrator=True).value
    assert commands["help"].get("default_member_permissions") is None


def admin_slash(fake: FakeDiscord, **options: str) -> FakeInteraction:
    """Runs /admin in USER's DM; its `user` option clashes with the first parameter of ``FakeDiscord.slash``."""
    command = fake._synced("admin", None)
    data = {"id": command["id"], "name": "admin", "type": 1, "resolved": {},
            "options": [{"name": k, "type": fake._option(command, k)["type"], "value": v} for k, v in options.items()]}
    person = FakeUser(USER)
    return fake._interact(2, person, fake.dm_channel(person), data, size_limit=None, permissions=None)


async def test_typed_options_become_the_handlers_arguments(fake_discord: FakeDiscord) -> None:
    recorder = Recorder(lambda event, channel: asyncio.sleep(0))
    picture = photo(96)
    async with adapter_for(fake_discord, recorder):
        fake_discord.slash(USER, "cartoon", style="anime", photo=picture)
        fake_discord.slash(USER, "cartoon")
        fake_discord.slash(USER, "talk", text="hello  there", round=True, photo=picture)
        fake_discord.slash(USER, "talk", round=False)
        fake_discord.slash(USER, "tryon", outfit=picture)
        admin_slash(fake_discord, action="ban", user="discord:42", reason="spam and abuse")
        admin_slash(fake_discord, action="stats", reason="ignored without a user")
        events = await settle(fake_discord, recorder, 7)
    got = sorted((e.command, e.args, [a.kind for a in e.attachments]) for e in events)
    assert got == sorted([
        ("cartoon", ["anime"], ["photo"]),
        ("cartoon", [], []),
        ("talk", ["round", "hello", "there"], ["photo"]),
        ("talk", [], []),
        ("tryon", [], ["photo"]),
        ("admin", ["ban", "discord:42", "spam", "and", "abuse"], []),
        ("admin", ["stats"], []),
    ])


async def test_cartoon_autocomplete_offers_installed_styles(fake_discord: FakeDiscord) -> None:
    book = load_cartoon_styles()
    installed = book.available({"cartoon"})
    assert installed
    recorder = Recorder()
    async with adapter_for(fake_discord, recorder, features={"cartoon"}):
        empty = fake_discord.autocomplete(USER, "cartoon", "style", "")
        typed = fake_discord.autocomplete(USER, "cartoon", "style", installed[0].display_name("en")[:3])
        nothing = fake_discord.autocomplete(USER, "cartoon", "style", "qqqqqq")
        await fake_discord.wait_idle(0.3)
    async with adapter_for(fake_discord, recorder, features=set()):
        uninstalled = fake_discord.autocomplete(USER, "cartoon", "style", "")
        await fake_discord.wait_idle(0.3)
    assert recorder.events == []

    def values(interaction: FakeInteraction) -> list[str]:
        (callback,) = fake_discord.interaction_responses(interaction)
        assert callback.json["type"] == 8
        return [c["value"] for c in callback.json["data"]["choices"]]

    assert values(empty) == [s.id for s in installed][:25]
    assert installed[0].id in values(typed)
    assert all(book.get(v) is not None for v in values(typed))
    assert values(nothing) == [] and values(uninstalled) == []


async def test_guild_ids_sync_the_commands_to_those_guilds_only(fake_discord: FakeDiscord) -> None:
    async with adapter_for(fake_discord, Recorder(), guild_ids=[GUILD]):
        guild_syncs = fake_discord.find("PUT", rf"/applications/{APP_ID}/guilds/{GUILD}/commands")
        assert fake_discord.find("PUT", rf"/applications/{APP_ID}/commands") == []
    assert len(guild_syncs) == 1
    assert "style" in {c["name"] for c in guild_syncs[0].json}


async def test_slash_command_is_deferred_then_answered_in_place_and_in_the_channel(fake_discord: FakeDiscord) -> None:
    async def reply(event: Event, channel: ReplyChannel) -> None:
        await channel.send_text(f"queued {' '.join(event.args)}", [[Button("Cancel", "cancel:7")]])
        await channel.send_text("one more thing")

    recorder = Recorder(reply)
    room = fake_discord.guild_channel()
    async with adapter_for(fake_discord, recorder):
        interaction = fake_discord.slash(FakeUser(USER, "lin", "zh-CN"), "style", channel=room, style="hanfu", count=3)
        (event,) = await settle(fake_discord, recorder)
    assert event.user.key == f"discord:{USER}" and event.language == "zh"
    assert event.chat.key == f"discord:{room['id']}" and not event.chat.is_private and event.chat.title == "portraits"
    assert (event.command, event.args) == ("style", ["hanfu", "3"])
    callback, *rest = fake_discord.interaction_responses(interaction)
    assert callback.json["type"] == 5 and callback.flags & EPHEMERAL  # "thinking…", for the requester only
    assert interaction.response_delay is not None and interaction.response_delay < INTERACTION_DEADLINE_S
    # The message with buttons is a normal channel message (editable after the token expired)...
    (posted,) = fake_discord.find("POST", rf"/channels/{room['id']}/messages")
    assert posted.content == "queued hanfu 3" and posted.custom_ids() == ["fc:cancel:7"]
    # ...and the plain answer fills the deferred (ephemeral) response.
    assert [(r.method, r.path.rsplit("/", 1)[-1], r.content) for r in rest] == [("PATCH", "@original", "one more thing")]


async def test_a_deferral_no_answer_used_is_removed(fake_discord: FakeDiscord) -> None:
    async def reply(event: Event, channel: ReplyChannel) -> None:
        await channel.send_text("catalogue", [[Button("Hanfu", "style:hanfu")]])

    recorder = Recorder(reply)
    async with adapter_for(fake_discord, recorder):
        interaction = fake_discord.slash(USER, "styles")
        await settle(fake_discord, recorder)
    methods = [(r.method, r.path.rsplit("/", 1)[-1]) for r in fake_discord.interaction_responses(interaction)]
    assert methods == [("POST", "callback"), ("DELETE", "@original")]
    dm = fake_discord.dm_channel(USER)
    assert [m["content"] for m in fake_discord.channel_messages(dm["id"]) if not m.get("_deleted")][-1] == "catalogue"


async def test_private_command_answers_only_the_requester_even_with_buttons(fake_discord: FakeDiscord) -> None:
    async def reply(event: Event, channel: ReplyChannel) -> None:
        await channel.send_text("Delete everything?", [[Button("Yes", "delete:abc"), Button("No", "keep:abc")]])

    recorder = Recorder(reply)
    room = fake_discord.guild_channel()
    async with adapter_for(fake_discord, recorder):
        interaction = fake_discord.slash(USER, "delete", channel=room)
        await settle(fake_discord, recorder)
    callback, edit = fake_discord.interaction_responses(interaction)
    assert callback.flags & EPHEMERAL
    assert edit.method == "PATCH" and edit.custom_ids() == ["fc:delete:abc", "fc:keep:abc"]
    assert fake_discord.find("POST", rf"/channels/{room['id']}/messages") == []


async def test_long_text_is_split_and_requester_only_text_uses_followups(fake_discord: FakeDiscord) -> None:
    long = "\n".join(f"line {i} " + "x" * 60 for i in range(60))

    async def reply(event: Event, channel: ReplyChannel) -> None:
        await channel.send_text(long)
        await channel.send_text("just for you", visibility=Visibility.REQUESTER)

    recorder = Recorder(reply)
    room = fake_discord.guild_channel()
    async with adapter_for(fake_discord, recorder):
        interaction = fake_discord.slash(USER, "help", channel=room)
        await settle(fake_discord, recorder)
    _, *answers = fake_discord.interaction_responses(interaction)
    assert all(len(a.content or "") <= 2000 for a in answers)
    assert "\n".join(a.content for a in answers[:-1]) == long
    assert answers[-1].method == "POST" and answers[-1].content == "just for you" and answers[-1].flags & EPHEMERAL


# -- autocomplete ---------------------------------------------------------------------------------
async def test_autocomplete_suggests_matching_styles(fake_discord: FakeDiscord) -> None:
    recorder = Recorder()
    async with adapter_for(fake_discord, recorder, features={"portrait"}):
        typed = fake_discord.autocomplete(USER, "style", "style", "water")
        empty = fake_discord.autocomplete(USER, "style", "style", "")
        chinese = fake_discord.autocomplete(FakeUser(OTHER, "mei", "zh-CN"), "style", "style", "汉服")
        nothing = fake_discord.autocomplete(USER, "style", "style", "qqqqqq")
        await fake_discord.wait_idle(0.3)
    async with adapter_for(fake_discord, recorder, features={"portrait", "portrait-sdxl"}):
        with_sdxl = fake_discord.autocomplete(USER, "style", "style", "water")
        await fake_discord.wait_idle(0.3)
    assert recorder.events == []  # suggestions never run the command

    def choices(interaction: FakeInteraction) -> list[dict]:
        (callback,) = fake_discord.interaction_responses(interaction)
        assert callback.json["type"] == 8
        assert interaction.response_delay < INTERACTION_DEADLINE_S
        return callback.json["data"]["choices"]

    values = [c["value"] for c in choices(typed)]
    assert values[0] == "watercolor" and "watercolor_sketch" not in values  # SDXL styles need their models
    assert [c["value"] for c in choices(with_sdxl)][:2] == ["watercolor", "watercolor_sketch"]
    first = choices(empty)
    assert len(first) == 25 and len({c["value"] for c in first}) == 25
    assert all(1 <= len(c["name"]) <= 100 for c in first)
    (hanfu,) = choices(chinese)
    assert hanfu["value"] == "hanfu" and "汉服" in hanfu["name"]
    assert choices(nothing) == []


# -- buttons --------------------------------------------------------------------------------------
async def test_button_press_is_acknowledged_then_answered_privately(fake_discord: FakeDiscord) -> None:
    async def reply(event: Event, channel: ReplyChannel) -> None:
        if event.command:
            await channel.send_text("results", [[Button("More like this", "more:a1b2")]])
            return
        await channel.answer_button("Not yours", alert=True)
        await channel.edit_text(MessageRef(event.chat, event.message_id or ""), "results (pressed)", None)

    recorder = Recorder(reply)
    room = fake_discord.guild_channel()
    async with adapter_for(fake_discord, recorder):
        fake_discord.slash(USER, "styles", channel=room)
        await settle(fake_discord, recorder)
        (posted,) = fake_discord.find("POST", rf"/channels/{room['id']}/messages")
        press = fake_discord.press(OTHER, posted.response, "fc:more:a1b2")
        _, event = await settle(fake_discord, recorder, 2)
    assert event.button_payload == "more:a1b2" and event.user.key == f"discord:{OTHER}"
    assert event.message_id == posted.response["id"] and event.chat.key == f"discord:{room['id']}"
    callback, note, edit = fake_discord.interaction_responses(press)
    assert callback.json["type"] == 6 and press.response_delay < INTERACTION_DEADLINE_S
    assert note.method == "POST" and note.content == "Not yours" and note.flags & EPHEMERAL
    assert edit.method == "PATCH" and edit.path.endswith("/messages/@original") and edit.custom_ids() == []
    assert fake_discord.messages[int(posted.response["id"])]["content"] == "results (pressed)"


async def test_buttons_keep_working_after_a_restart(fake_discord: FakeDiscord) -> None:
    async def reply(event: Event, channel: ReplyChannel) -> None:
        await channel.send_text("Portraits: waiting", [[Button("Cancel", "cancel:9")]])

    async with adapter_for(fake_discord, (before := Recorder(reply))):
        fake_discord.slash(USER, "style", style="hanfu")
        await settle(fake_discord, before)
    (posted,) = fake_discord.find("POST", rf"/channels/{fake_discord.dm_channel(USER)['id']}/messages")
    after = Recorder()
    async with adapter_for(fake_discord, after):  # a new process: nothing of the old view in memory
        press = fake_discord.press(USER, posted.response, "fc:cancel:9")
        (event,) = await settle(fake_discord, after)
    assert event.button_payload == "cancel:9" and event.message_id == posted.response["id"]
    assert fake_discord.interaction_responses(press)[0].json["type"] == 6
    assert fake_discord.connections == ["identify", "identify"]


# -- DMs and files --------------------------------------------------------------------------------
async def test_dm_files_become_attachments_fetched_on_demand(fake_discord: FakeDiscord) -> None:
    fetched: dict[str, bytes] = {}

    async def reply(event: Event, channel: ReplyChannel) -> None:
        for attachment in event.attachments:
            fetched[attachment.filename or ""] = await attachment.fetch()
        await channel.send_text(f"got {len(event.attachments)}")

    recorder = Recorder(reply)
    image = photo()
    async with adapter_for(fake_discord, recorder):
        fake_discord.dm(USER, "", [(image, "me.jpg", "image/jpeg"), (b"notes\n", "notes.txt", "text/plain; charset=utf-8")])
        (event,) = await settle(fake_discord, recorder)
        fake_discord.dm(USER, "/status now")
        _, typed = await settle(fake_discord, recorder, 2)
    assert [(a.kind, a.mime_type, a.size) for a in event.attachments] == [
        ("photo", "image/jpeg", len(image)), ("document", "text/plain", 6)]
    assert fetched == {"me.jpg": image, "notes.txt": b"notes\n"}
    assert event.chat.is_private and event.command is None and event.message_id
    assert (typed.command, typed.args) == ("status", ["now"])
    dm = fake_discord.dm_channel(USER)
    replies = fake_discord.find("POST", rf"/channels/{dm['id']}/messages")
    assert [r.content for r in replies] == ["got 2", "got 0"]


async def test_selfie_command_hands_over_its_photos(fake_discord: FakeDiscord) -> None:
    fetched: list[bytes] = []

    async def reply(event: Event, channel: ReplyChannel) -> None:
        fetched.extend([await a.fetch() for a in event.attachments])

    recorder = Recorder(reply)
    first, second = photo(128), photo(200)
    async with adapter_for(fake_discord, recorder):
        fake_discord.slash(USER, "selfie", photo1=first, photo3=(second, "two.png", "image/png"))
        (event,) = await settle(fake_discord, recorder)
    assert event.command is None and [a.kind for a in event.attachments] == ["photo", "photo"]
    assert fetched == [first, second]


async def test_results_are_shrunk_to_the_interactions_upload_limit(fake_discord: FakeDiscord, tmp_path: Path) -> None:
    big = tmp_path / "portrait.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (600, 400, 3), dtype=np.uint8)).save(big)  # noise: large as PNG
    small = tmp_path / "small.png"
    Image.new("RGB", (32, 32), (10, 200, 30)).save(small)
    limit = 120_000
    fake_discord.upload_limit = limit

    async def reply(event: Event, channel: ReplyChannel) -> None:
        await channel.send_images([Media(path=big), Media(path=big), Media(path=small)], caption="Your portraits",
                                  buttons=[[Button("More 1", "more:a")], [Button("More 2", "more:b")]])

    recorder = Recorder(reply)
    room = fake_discord.guild_channel()
    async with adapter_for(fake_discord, recorder):
        interaction = fake_discord.slash(USER, "styles", channel=room, size_limit=limit)
        await settle(fake_discord, recorder)
    posts = fake_discord.find("POST", rf"/channels/{room['id']}/messages")
    assert posts and all(sum(len(d) for _, d in p.files) <= limit for p in posts)
    uploads = [(name, data) for p in posts for name, data in p.files]
    assert len(uploads) == 3
    for name, data in uploads[:2]:
        with Image.open(io.BytesIO(data)) as img:
            assert name == "portrait.jpg" and img.format == "JPEG"
            assert abs(img.width / img.height - 400 / 600) < 0.02
    assert uploads[2] == ("small.png", small.read_bytes())  # within the limit: sent untouched
    assert posts[0].content == "Your portraits"
    assert posts[-1].custom_ids() == ["fc:more:a", "fc:more:b"] and all(not p.custom_ids() for p in posts[:-1])
    assert fake_discord.interaction_responses(interaction)[-1].method == "DELETE"  # results are never ephemeral


# -- failures -------------------------------------------------------------------------------------
async def test_expired_token_answers_go_to_the_dm_or_the_channel(fake_discord: FakeDiscord) -> None:
    async def reply(event: Event, channel: ReplyChannel) -> None:
        fake_discord.expire_tokens()
        await channel.send_text(f"answer to {event.command}")

    recorder = Recorder(reply)
    room = fake_discord.guild_channel()
    async with adapter_for(fake_discord, recorder):
        fake_discord.slash(USER, "help")  # in the DM
        await settle(fake_discord, recorder)
        fake_discord.clear_failures()
        fake_discord.slash(USER, "status", channel=room)  # private, in a server
        await settle(fake_discord, recorder, 2)
        fake_discord.clear_failures()
        fake_discord.slash(USER, "help", channel=room)  # public, in a server
        await settle(fake_discord, recorder, 3)
    refused = [r for r in fake_discord.find("PATCH", WEBHOOK + "/messages/@original", ok_only=False)]
    assert [r.status for r in refused] == [401, 401, 401]
    dm = fake_discord.dm_channel(USER)
    assert [r.content for r in fake_discord.find("POST", rf"/channels/{dm['id']}/messages")] == [
        "answer to help", "answer to status"]
    assert [r.content for r in fake_discord.find("POST", rf"/channels/{room['id']}/messages")] == ["answer to help"]


async def test_a_dismissed_thinking_message_leaves_the_answer_to_a_followup(fake_discord: FakeDiscord) -> None:
    async def reply(event: Event, channel: ReplyChannel) -> None:
        await channel.send_text("your status")

    recorder = Recorder(reply)
    room = fake_discord.guild_channel()
    fake_discord.fail("PATCH", WEBHOOK + "/messages/@original", 404, 10008, "Unknown Message", times=1)
    async with adapter_for(fake_discord, recorder):
        interaction = fake_discord.slash(USER, "status", channel=room)
        await settle(fake_discord, recorder)
    _, refused, followup = fake_discord.interaction_responses(interaction)
    assert refused.status == 404 and followup.method == "POST" and followup.ok
    assert followup.content == "your status" and followup.flags & EPHEMERAL


async def test_a_late_acknowledgement_still_gets_the_answer_through(fake_discord: FakeDiscord) -> None:
    async def reply(event: Event, channel: ReplyChannel) -> None:
        await channel.send_text("still here")

    recorder = Recorder(reply)
    fake_discord.fail("POST", r"/interactions/.*", 404, 10062, "Unknown interaction", times=1)
    async with adapter_for(fake_discord, recorder):
        fake_discord.slash(USER, "start")
        await settle(fake_discord, recorder)
    dm = fake_discord.dm_channel(USER)
    assert [r.content for r in fake_discord.find("POST", rf"/channels/{dm['id']}/messages")] == ["still here"]
    assert fake_discord.find("PATCH", WEBHOOK + "/messages/@original", ok_only=False) == []


async def test_servers_and_channels_outside_the_allow_lists_are_refused(fake_discord: FakeDiscord) -> None:
    recorder = Recorder()
    allowed = fake_discord.guild_channel(GUILD)
    elsewhere = fake_discord.guild_channel(GUILD, name="random")
    foreign = fake_discord.guild_channel(GUILD + 1)
    async with adapter_for(fake_discord, recorder, allowed_guilds=[GUILD], allowed_channels=[int(allowed["id"])]):
        refusals = [fake_discord.slash(USER, "start", channel=c) for c in (elsewhere, foreign)]
        fake_discord.slash(USER, "start", channel=allowed)
        fake_discord.slash(USER, "start")  # DMs are always allowed
        await recorder.wait(2)
        await fake_discord.wait_idle(0.2)
    assert [e.chat.id for e in recorder.events] == [allowed["id"], fake_discord.dm_channel(USER)["id"]]
    for interaction in refusals:
        (callback,) = fake_discord.interaction_responses(interaction)
        assert callback.json["type"] == 4 and callback.flags & EPHEMERAL
        assert callback.json["data"]["content"] == t("core.chat_denied", "en")


async def test_a_wrong_token_fails_start(fake_discord: FakeDiscord) -> None:
    settings = fake_discord.bot_settings(discord={"token": "not-the-token"})
    import discord

    with pytest.raises(discord.LoginFailure):
        async with DiscordAdapter(settings, dispatch=Recorder()):
            pass


# -- pure helpers ---------------------------------------------------------------------------------
def test_fit_image_keeps_small_files_and_shrinks_large_ones() -> None:
    buf = io.BytesIO()
    Image.fromarray(skdata.astronaut()).save(buf, format="PNG")
    data = buf.getvalue()
    assert fit_image(data, "a.png", len(data)) == (data, "a.png")
    shrunk, name = fit_image(data, "a.png", 20_000)
    assert name == "a.jpg" and len(shrunk) <= 20_000
    with Image.open(io.BytesIO(shrunk)) as img:
        assert img.width == img.height and img.width >= 64


def test_keyboards_and_file_groups_respect_discords_limits() -> None:
    rows = [[Button(f"b{i}-{j}", f"more:{i}{j}") for j in range(7)] for i in range(4)]
    pads = keyboards(rows)
    assert all(len(pad) <= 5 and all(len(row) <= 5 for row in pad) for pad in pads)
    assert [b.payload for pad in pads for row in pad for b in row] == [b.payload for row in rows for b in row]
    assert keyboards(None) == []
    files = [(b"x" * 40, f"{i}.png") for i in range(12)]
    assert pack_files(files, 100) == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [10, 11]]
    assert pack_files(files, 10_000) == [list(range(10)), [10, 11]]
