"""/makestyle's parts without models: the Discord slash command, who may make styles, names, hashes, the
style file it writes, and the face check's counting."""
from __future__ import annotations

import io
import tomllib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bot.app import open_service
from bot.config import ConfigError, Settings, load_config
from bot.ops.logsetup import configure_logging
from facechain_core.style_maker import count_same_person
from facechain_core.styles import load_style
from handlers.makestyle import build_style, dhash, hamming, parse_names, style_toml
from handlers.messages import t
from tests.fixtures.fake_discord import FakeDiscord
from tests.fixtures.fake_discord import fake_discord  # noqa: F401
from tests.test_e2e_discord import answer_of
from tests.test_e2e_makestyle import look

pytestmark = pytest.mark.timeout(90)
USER = 412345678901234599


@pytest.fixture
def settings(fake_discord: FakeDiscord, tmp_path: Path, yunet_path: Path) -> Settings:  # noqa: F811
    return fake_discord.bot_settings(
        data_dir=tmp_path / "data", models_dir=yunet_path.parent, selfie={"detector_model": yunet_path.name},
        scheduler={"progress_interval_s": 0}, styles={"makestyle": "everyone", "min_side": 64})


async def test_discord_makestyle_takes_pictures_in_a_dm_only(fake_discord: FakeDiscord, settings: Settings) -> None:  # noqa: F811
    fake = fake_discord
    configure_logging(settings)
    async with open_service(settings):
        # fake.slash finds the command among those the bot synced (it fails for one never registered).
        mark = fake.mark()
        asked = fake.slash(USER, "makestyle", text="stripes bold stripes", photo1=look(1), photo2=look(2))
        answer = await answer_of(fake, asked, mark)
        assert t("makestyle.send_examples", "en", name="stripes", low=5, high=30) in answer
        mark = fake.mark()
        more = fake.slash(USER, "makestyle", text="done")
        assert await answer_of(fake, more, mark) == t("makestyle.too_few", "en", count=2, low=5)
        room = fake.guild_channel()
        mark = fake.mark()
        public = fake.slash(USER, "makestyle", channel=room, text="other")
        assert await answer_of(fake, public, mark) == t("makestyle.private_only", "en")
    kept = sorted((settings.data_dir / "users" / f"discord:{USER}" / "makestyle" / "stripes" / "examples").glob("*.jpg"))
    assert len(kept) == 2


async def test_only_admins_make_styles_by_default(fake_discord: FakeDiscord, tmp_path: Path,  # noqa: F811
                                                  yunet_path: Path) -> None:
    settings = fake_discord.bot_settings(data_dir=tmp_path / "data", models_dir=yunet_path.parent,
                                         selfie={"detector_model": yunet_path.name})
    assert settings.styles.makestyle == "admins"
    async with open_service(settings):
        mark = fake_discord.mark()
        asked = fake_discord.slash(USER, "makestyle", text="stripes")
        assert await answer_of(fake_discord, asked, mark) == t("makestyle.not_allowed", "en")


def test_config_keys_are_checked(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text('[styles]\nmakestyle = "anyone"\n')
    with pytest.raises(ConfigError, match="styles.makestyle"):
        load_config(path, environ={})
    path.write_text('[styles]\nmin_examples = 10\nmax_examples = 5\n')
    with pytest.raises(ConfigError, match="styles.max_examples"):
        load_config(path, environ={})


def test_names_hashes_and_the_style_file(tmp_path: Path) -> None:
    assert parse_names("en:Ink wash  zh:水墨 画") == {"en": "Ink wash", "zh": "水墨 画"}
    assert parse_names("Ink wash") == {}
    a, b = (Image.open(io.BytesIO(look(seed))) for seed in (1, 2))
    assert hamming(dhash(a), dhash(a.resize((60, 60)))) <= 6  # the same picture resized is a duplicate
    assert hamming(dhash(a), dhash(b)) > 6
    style = build_style("inkwash", "ink wash, grey", "zwx style")
    folder = tmp_path / "inkwash"
    folder.mkdir()
    (folder / "inkwash.toml").write_text(style_toml(style.model_dump(mode="json")), encoding="utf-8")
    loaded = load_style(folder / "inkwash.toml", folder)
    assert loaded == style and loaded.lora.source == "local" and "zwx style" in loaded.prompt
    assert tomllib.loads((folder / "inkwash.toml").read_text())["lora"]["file"] == "inkwash.safetensors"


def test_one_face_in_many_examples_is_counted_once_per_example() -> None:
    rng = np.random.default_rng(0)
    person, other = (v / np.linalg.norm(v) for v in rng.normal(size=(2, 512)))
    faces = [(0, person), (0, person), (1, person), (2, other), (3, person)]
    assert count_same_person(faces) == 3  # examples 0, 1 and 3; two faces in example 0 count once
    assert count_same_person([]) == 0


class _Faces:
    """Stands in for the detector and ArcFace: each picture holds the faces (embeddings) given for it."""

    def __init__(self, faces_per_picture: list[list[np.ndarray]]) -> None:
        self.queue = [list(f) for f in faces_per_picture]
        self.current: list[np.ndarray] = []

    def detect(self, rgb: np.ndarray) -> list:
        from facechain_core.faces import Face

        self.current = self.queue.pop(0)
        return [Face((0, 0, 10, 10), [(i, 0)] * 5, 0.9) for i in range(len(self.current))]

    def embed_face(self, rgb: np.ndarray, landmarks) -> np.ndarray:
        return self.current[int(landmarks[0][0])]


def test_face_check_lets_the_makers_own_face_through(tmp_path: Path) -> None:
    from facechain_core.errors import UserFacingError
    from facechain_core.identity import Identity, save_identity
    from facechain_core.style_maker import StyleLoraPipeline

    rng = np.random.default_rng(1)
    maker, stranger = (v / np.linalg.norm(v) for v in rng.normal(size=(2, 512)))
    identity = tmp_path / "identity.npz"
    save_identity(Identity(maker.astype(np.float32), maker[None].astype(np.float32),
                           np.zeros((256, 256, 3), np.uint8)), identity)
    pictures = [Image.new("RGB", (32, 32))] * 5
    pipe = StyleLoraPipeline()
    pipe._detector = pipe._arcface = _Faces([[maker]] * 5)
    pipe._check_faces(pictures, str(identity), 3)  # the maker in every picture: their own look, allowed
    pipe._detector = pipe._arcface = _Faces([[maker, stranger]] * 4 + [[]])
    with pytest.raises(UserFacingError) as refused:
        pipe._check_faces(pictures, str(identity), 3)
    assert refused.value.code == "makestyle.one_person" and refused.value.details["count"] == 4
    pipe._detector = pipe._arcface = _Faces([[stranger]] * 3 + [[]] * 2)
    pipe._check_faces(pictures, None, 3)  # three is "a few": allowed
