"""Style previews: rendered on tiny models by `styles previews`, cached by the style's hash, shown by /styles
as an album followed by the page's buttons (Telegram) or as an embed gallery (Discord)."""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from bot import style_previews
from bot.app import open_service
from bot.config import Settings
from facechain_core.styles import DEFAULT_STYLES_DIR, load_styles, preview_path
from handlers import portrait
from handlers.portrait import STYLES_PER_PAGE
from handlers.protocols import Event, ReplyChannel
from tests.fixtures.fake_discord import FakeDiscord, fake_discord  # noqa: F401
from tests.fixtures.portrait_service import TINY_PIPELINE, portrait_settings, tiny_model_paths
from tests.fixtures.recorder import Recorder
from tests.fixtures.tiny_models import one_torch_thread, tiny_models_dir  # noqa: F401

pytestmark = pytest.mark.slow
USER = 5151


def _styles(folder: Path, ids: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for style_id in ids:
        shutil.copy(DEFAULT_STYLES_DIR / f"{style_id}.toml", folder / f"{style_id}.toml")
    return folder


def _args(**changes: object) -> argparse.Namespace:
    return argparse.Namespace(**{"face": None, "style": None, "force": False, "seed": 1234, **changes})


def test_previews_are_rendered_once_per_style_hash_and_skip_styles_whose_models_are_missing(
        tmp_path, tiny_models_dir, yunet_path, one_torch_thread, capsys):  # noqa: F811
    styles_dir = _styles(tmp_path / "styles", ["hanfu", "cinematic", "papercut"])
    settings = Settings(data_dir=tmp_path / "data", models_dir=tiny_models_dir, styles_dir=styles_dir,
                        model_paths=tiny_model_paths(tiny_models_dir, yunet_path),
                        selfie={"detector_model": str(yunet_path)}, pipeline=TINY_PIPELINE)
    assert style_previews.run(_args(), settings) == 0
    out = capsys.readouterr().out
    catalogue = load_styles(styles_dir)
    hanfu, cinematic = preview_path(settings.data_dir, catalogue["hanfu"]), preview_path(
        settings.data_dir, catalogue["cinematic"])
    assert f"rendered  hanfu" in out and "rendered  cinematic" in out  # sd15 on its default base, and SDXL
    assert "skipped   papercut" in out and "style-lora-papercut" in out  # its LoRA is not pulled
    assert not preview_path(settings.data_dir, catalogue["papercut"]).exists()
    for path in (hanfu, cinematic):
        with Image.open(path) as image:
            assert image.format == "JPEG" and image.size == (64, 64)  # TINY_PIPELINE renders 64x64
    stamp = hanfu.stat().st_mtime_ns

    assert style_previews.run(_args(style=["hanfu", "cinematic"]), settings) == 0
    assert "all 2 previews are cached" in capsys.readouterr().out and hanfu.stat().st_mtime_ns == stamp

    edited = (styles_dir / "hanfu.toml").read_text(encoding="utf-8").replace("jade hairpin", "gold hairpin")
    (styles_dir / "hanfu.toml").write_text(edited, encoding="utf-8")
    assert style_previews.run(_args(style=["hanfu"]), settings) == 0
    fresh = preview_path(settings.data_dir, load_styles(styles_dir)["hanfu"])
    assert fresh != hanfu and fresh.is_file() and not hanfu.exists()  # the stale preview is gone
    assert sorted(p.name for p in (settings.data_dir / "previews").iterdir()) == sorted([fresh.name, cinematic.name])


async def test_styles_shows_the_previews_of_a_page_as_an_album_then_its_buttons(
        fake_telegram, tmp_path, tiny_models_dir, yunet_path, one_torch_thread):  # noqa: F811
    ids = sorted(p.stem for p in DEFAULT_STYLES_DIR.glob("*.toml") if "family = \"sd15\"" in p.read_text()
                 and "[lora]" not in p.read_text())[:STYLES_PER_PAGE + 2]
    styles_dir = _styles(tmp_path / "styles", ids)
    settings = portrait_settings(fake_telegram, tmp_path / "data", tiny_models_dir, yunet_path,
                                 styles_dir=styles_dir)
    first_page = load_styles(styles_dir).page(0, STYLES_PER_PAGE).styles
    assert style_previews.run(_args(style=[s.id for s in first_page]), settings) == 0
    fake = fake_telegram
    async with open_service(settings):
        mark = fake.mark()
        fake.send_message(USER, None, "/styles")
        menu = await fake.wait_for("sendMessage", lambda c: "styles:1" in c.buttons, since=mark, timeout=10)
        album = await fake.wait_for("sendMediaGroup", since=mark, timeout=10)
        assert fake.calls.index(album) < fake.calls.index(menu)  # the pictures first, then the buttons
        assert [m["caption"] for m in album.params["media"]] == [s.display_name("en") for s in first_page]
        uploads = fake.uploads(album)
        assert uploads == [preview_path(settings.data_dir, s).read_bytes() for s in first_page]
        assert sum(p.startswith("style:") for p in menu.buttons) == STYLES_PER_PAGE

        # Page 2 has no previews: the menu message turns its page in place, as before.
        mark = fake.mark()
        fake.press_button(menu.result, "styles:1", user=USER)
        page2 = await fake.wait_for("editMessageText", since=mark, timeout=10)
        assert "styles:0" in page2.buttons and not fake.calls_of("sendMediaGroup")[1:]

        # Back to page 1: its album comes again, with a new message for the buttons.
        mark = fake.mark()
        fake.press_button(menu.result, "styles:0", user=USER)
        again = await fake.wait_for("sendMediaGroup", since=mark, timeout=10)
        assert len(again.params["media"]) == STYLES_PER_PAGE
        await fake.wait_for("sendMessage", lambda c: "styles:1" in c.buttons, since=mark, timeout=10)


async def test_discord_shows_a_page_of_previews_as_an_embed_gallery(fake_discord: FakeDiscord,  # noqa: F811
                                                                    tmp_path: Path) -> None:
    from tests.test_discord_adapter import USER as DISCORD_USER, adapter_for, settle

    catalogue = load_styles()
    services = SimpleNamespace(styles=catalogue, features_installed={"portrait"}, data_dir=tmp_path,
                               settings=SimpleNamespace(model_paths={}))
    page = portrait._catalogue(services).page(0, STYLES_PER_PAGE).styles
    for index, style in enumerate(page[:5]):  # a page with some previews shows those it has
        target = preview_path(tmp_path, style)
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (48, 64), (index * 40, 90, 160)).save(target, format="JPEG")

    async def reply(event: Event, channel: ReplyChannel) -> None:
        await portrait.show_styles(services, event, channel)  # type: ignore[arg-type]

    recorder = Recorder(reply)
    room = fake_discord.guild_channel()
    async with adapter_for(fake_discord, recorder):
        fake_discord.slash(DISCORD_USER, "styles", channel=room)
        await settle(fake_discord, recorder)
    post, *more = fake_discord.find("POST", rf"/channels/{room['id']}/messages")
    assert not any(p.files or p.json.get("embeds") for p in more)  # only buttons past Discord's 5 rows follow
    embeds = post.json["embeds"]
    assert [e["title"] for e in embeds] == [s.display_name("en") for s in page[:5]]
    names = [name for name, _ in post.files]
    assert [e["image"]["url"] for e in embeds] == [f"attachment://{name}" for name in names]
    assert [data for _, data in post.files] == [preview_path(tmp_path, s).read_bytes() for s in page[:5]]
    ids = [i for p in [post, *more] for i in p.custom_ids()]
    assert "fc:styles:1" in ids and sum(i.startswith("fc:style:") for i in ids) == STYLES_PER_PAGE
    assert post.content.startswith("Styles")
