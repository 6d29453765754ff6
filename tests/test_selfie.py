"""The selfie check on real photos, synthetic failures, and the SCRFD decode path."""
from __future__ import annotations

import io
import json
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

from facechain_core.errors import UserFacingError
from facechain_core.faces import Face, ScrfdDetector, YuNetDetector, create_detector
from facechain_core.images import encode_jpeg
from facechain_core.selfie import (
    SelfieResult, SelfieThresholds, check_selfie, detect_faces, face_record, pick_main_face,
)
from handlers.messages import catalogue

LIMITS = {"max_bytes": 20_000_000, "max_pixels": 40_000_000}
DEFAULTS = SelfieThresholds()

# Expected verdicts: None is accepted. obama_small.jpg (320x240) is accepted: its face box is
# 104x149 px, above min_face_px=64; obama_partial_face.jpg is obama.jpg cut through the cheek.
VERDICTS = {
    "obama.jpg": None,
    "obama2.jpg": None,
    "obama3.jpg": None,
    "biden.jpg": None,
    "32bit.png": None,
    "obama_small.jpg": None,
    "two_people.jpg": "selfie.several_faces",
    "obama_partial_face.jpg": "selfie.face_cut_off",
}


@pytest.fixture
def yunet(yunet_path: Path) -> YuNetDetector:
    return YuNetDetector(yunet_path)


def check(data: bytes, detector, thresholds: SelfieThresholds = DEFAULTS) -> SelfieResult:
    return check_selfie(data, detector, thresholds, **LIMITS)


def rejection(data: bytes, detector, thresholds: SelfieThresholds = DEFAULTS) -> UserFacingError:
    with pytest.raises(UserFacingError) as info:
        check(data, detector, thresholds)
    return info.value


def assert_accepted_with_margin(result: SelfieResult, original_size: tuple[int, int]) -> None:
    x, y, w, h = result.face.box
    width, height = result.image.size
    assert result.image.mode == "RGB" and result.image.size == original_size
    assert result.faces_found == 1
    assert 0 <= x and 0 <= y and x + w <= width and y + h <= height
    # Every landmark sits inside the face box, eyes above the mouth, image-left eye first.
    assert all(x <= px <= x + w and y <= py <= y + h for px, py in result.face.landmarks)
    (rex, rey), (lex, ley), _, (rmx, rmy), (lmx, lmy) = result.face.landmarks
    assert rex < lex and rmx < lmx and max(rey, ley) < min(rmy, lmy)
    # Margins, so that small changes of codec or detector don't flip the verdict.
    assert min(w, h) >= 1.25 * DEFAULTS.min_face_px
    assert result.sharpness >= 2 * DEFAULTS.min_sharpness
    assert result.brightness >= 2 * DEFAULTS.min_brightness


@pytest.mark.parametrize("name, expected", VERDICTS.items())
def test_real_photo_verdicts(name, expected, faces_dir, yunet):
    data = (faces_dir / name).read_bytes()
    if expected is None:
        assert_accepted_with_margin(check(data, yunet), Image.open(io.BytesIO(data)).size)
    else:
        assert rejection(data, yunet).code == expected


def test_two_people_reports_the_count_and_passes_when_dominance_is_off(faces_dir, yunet):
    data = (faces_dir / "two_people.jpg").read_bytes()
    assert rejection(data, yunet).details == {"count": 2}
    result = check(data, yunet, SelfieThresholds(dominance_ratio=1.0))
    assert result.faces_found == 2
    assert result.face.area == max(f.area for f in detect_faces(result.image, yunet, 1280))


def test_partial_face_is_rejected_for_the_frame_edge_only(faces_dir, yunet):
    data = (faces_dir / "obama_partial_face.jpg").read_bytes()
    result = check(data, yunet, SelfieThresholds(min_edge_margin=-1.0))
    assert result.face.box[0] < 0.02 * result.face.box[3]


def test_small_photo_verdict_is_decided_by_min_face_px(faces_dir, yunet):
    data = (faces_dir / "obama_small.jpg").read_bytes()
    face_px = min(check(data, yunet).face.box[2:])
    error = rejection(data, yunet, SelfieThresholds(min_face_px=int(face_px) + 10))
    assert error.code == "selfie.face_too_small"
    assert error.details["face_px"] == round(face_px)


def test_face_small_in_a_large_frame_is_too_small(faces_dir, yunet):
    photo = Image.open(faces_dir / "obama.jpg").convert("RGB")
    canvas = Image.new("RGB", (photo.width * 5, photo.height * 5), (128, 128, 128))
    canvas.paste(photo, (photo.width, photo.height))
    assert rejection(encode_jpeg(canvas), yunet).code == "selfie.face_too_small"


def test_a_clearly_dominant_face_wins_over_a_small_one(faces_dir, yunet):
    photo = Image.open(faces_dir / "obama.jpg").convert("RGB")
    other = Image.open(faces_dir / "biden.jpg").convert("RGB")
    other = other.resize((200, round(200 * other.height / other.width)))
    photo.paste(other, (0, photo.height - other.height))
    data = encode_jpeg(photo)
    result = check(data, yunet)
    assert result.faces_found == 2
    assert 300 < result.face.box[0] < 450  # obama's face, not biden's at the bottom left
    assert rejection(data, yunet, SelfieThresholds(dominance_ratio=40.0)).code == "selfie.several_faces"


def test_skimage_astronaut_is_accepted(yunet):
    data = pytest.importorskip("skimage.data").astronaut()
    assert_accepted_with_margin(check(encode_jpeg(Image.fromarray(data)), yunet), (512, 512))


def test_heavy_blur_is_too_blurry(faces_dir, yunet):
    photo = Image.open(faces_dir / "obama.jpg").convert("RGB")
    error = rejection(encode_jpeg(photo.filter(ImageFilter.GaussianBlur(8))), yunet)
    assert error.code == "selfie.too_blurry"
    assert error.details["sharpness"] < DEFAULTS.min_sharpness / 2


def test_darkened_photo_is_too_dark(faces_dir, yunet):
    photo = np.asarray(Image.open(faces_dir / "obama.jpg").convert("RGB"))
    error = rejection(encode_jpeg(Image.fromarray((photo * 0.1).astype(np.uint8))), yunet)
    assert error.code == "selfie.too_dark"
    assert error.details["brightness"] < DEFAULTS.min_brightness / 2


def test_black_photo_is_too_dark_and_grey_has_no_face(yunet):
    assert rejection(encode_jpeg(Image.new("RGB", (400, 300))), yunet).code == "selfie.too_dark"
    grey = Image.new("RGB", (400, 300), (128, 128, 128))
    assert rejection(encode_jpeg(grey), yunet).code == "selfie.no_face"


def test_decode_errors_pass_through(yunet):
    assert rejection(b"not an image", yunet).code == "image.not_image"


def test_detection_on_a_downscaled_copy_maps_back_to_original_pixels(faces_dir, yunet):
    data = (faces_dir / "obama3.jpg").read_bytes()  # 1434x2333
    full = check(data, yunet).face
    coarse = check(data, yunet, SelfieThresholds(max_side_for_detection=400)).face
    assert np.allclose(coarse.box, full.box, atol=0.06 * full.box[3])
    assert np.allclose(coarse.landmarks, full.landmarks, atol=0.06 * full.box[3])


def test_exif_rotated_selfie_is_found_upright(faces_dir, yunet):
    photo = Image.open(faces_dir / "obama.jpg").convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored lying on its side, as phones do
    buf = io.BytesIO()
    photo.transpose(Image.Transpose.ROTATE_90).save(buf, "JPEG", quality=95, exif=exif.tobytes())
    result = check(buf.getvalue(), yunet)
    assert result.image.size == photo.size
    assert abs(result.face.box[0] - 371) < 15 and abs(result.face.box[1] - 91) < 15


def test_face_record_is_json_and_complete(faces_dir, yunet):
    result = check((faces_dir / "obama.jpg").read_bytes(), yunet)
    record = json.loads(json.dumps(face_record(result)))
    assert record["width"] == 910 and record["height"] == 1137
    assert record["box"] == pytest.approx(list(result.face.box), abs=0.01)
    assert len(record["landmarks"]) == 5 and all(len(p) == 2 for p in record["landmarks"])
    assert 0.7 <= record["score"] <= 1.0
    assert record["faces_found"] == 1


def test_yunet_is_safe_to_share_between_threads(faces_dir, yunet):
    names = ("obama.jpg", "biden.jpg", "obama_small.jpg")
    photos = [np.asarray(Image.open(faces_dir / n).convert("RGB")) for n in names]
    expected = [yunet.detect(p)[0].box for p in photos]
    results: dict[int, tuple] = {}

    def work(i: int) -> None:
        results[i] = yunet.detect(photos[i % 3])[0].box

    threads = [threading.Thread(target=work, args=(i,)) for i in range(9)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(np.allclose(results[i], expected[i % 3]) for i in range(9))


def test_pick_main_face_and_threshold_validation():
    big = Face(box=(0, 0, 100, 100), landmarks=[(0, 0)] * 5, score=0.9)
    half = Face(box=(0, 0, 50, 50), landmarks=[(0, 0)] * 5, score=0.9)
    assert pick_main_face([half, big], 4.0) is big
    with pytest.raises(UserFacingError, match="several_faces"):
        pick_main_face([half, big], 4.01)
    with pytest.raises(ValueError, match="dominance_ratio"):
        SelfieThresholds(dominance_ratio=0.5)


def test_every_code_has_english_and_chinese():
    codes = ["image.too_large", "image.not_image", "image.corrupt", "image.too_many_pixels", "image.animated",
             "selfie.no_face", "selfie.several_faces", "selfie.face_too_small", "selfie.face_cut_off",
             "selfie.too_blurry", "selfie.too_dark"]
    for code in codes:
        assert catalogue()[code].keys() >= {"en", "zh"}, code


# --- SCRFD: a tiny model with insightface's output signature and hand-set weights -------------
# Each stride fires on one colour channel, in one of its two anchors, so a coloured square
# aligned to that stride's grid becomes exactly one detection at a known place.
STRIDES = (8, 16, 32)
FIRES = {8: (0, 0), 16: (1, 1), 32: (2, 0)}  # stride -> (channel watched, anchor that fires)
DIST = {8: (4.0, 4.5, 5.0, 5.5), 16: (1.0, 1.5, 2.0, 2.5), 32: (2.0, 1.0, 1.5, 0.5)}  # l, t, r, b
KPS = ((-0.5, -0.4), (0.5, -0.4), (0.0, 0.0), (-0.3, 0.5), (0.3, 0.5))


def export_tiny_scrfd(path: Path, batched: bool = False, outputs: int = 9) -> Path:
    torch = pytest.importorskip("torch")
    nn = torch.nn

    class TinyScrfd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pools = nn.ModuleList(nn.AvgPool2d(s) for s in STRIDES)
            self.scores = nn.ModuleList(nn.Conv2d(3, 2, 1) for _ in STRIDES)
            self.boxes = nn.ModuleList(nn.Conv2d(3, 8, 1) for _ in STRIDES)
            self.kps = nn.ModuleList(nn.Conv2d(3, 20, 1) for _ in STRIDES)
            with torch.no_grad():
                for i, s in enumerate(STRIDES):
                    channel, anchor = FIRES[s]
                    for conv in (self.scores[i], self.boxes[i], self.kps[i]):
                        conv.weight.zero_()
                    self.scores[i].bias.fill_(-30.0)
                    # A cell fires when most of it is bright in the watched channel.
                    self.scores[i].weight[anchor, channel] = 20.0
                    self.scores[i].bias[anchor] = -10.0
                    self.boxes[i].bias.copy_(torch.tensor(DIST[s] * 2))
                    self.kps[i].bias.copy_(torch.tensor([v for p in KPS for v in p] * 2))

        def forward(self, x):
            shape = (1, -1) if batched else (-1,)
            heads = []
            for convs, width in ((self.scores, 1), (self.boxes, 4), (self.kps, 10)):
                for pool, conv in zip(self.pools, convs):
                    y = conv(pool(x))
                    y = y.sigmoid() if width == 1 else y
                    heads.append(y.permute(0, 2, 3, 1).reshape(*shape, width))
            return tuple(heads[:outputs])

    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(TinyScrfd().eval(), (torch.zeros(1, 3, 640, 640),), str(path), dynamo=False,
                          input_names=["input.1"], opset_version=17)
    return path


@pytest.fixture(scope="module")
def scrfd_models(tmp_path_factory) -> dict[bool, Path]:
    folder = tmp_path_factory.mktemp("scrfd")
    return {batched: export_tiny_scrfd(folder / f"scrfd_{batched}.onnx", batched)
            for batched in (False, True)}


def expected_face(stride: int, center: tuple[float, float], scale: float = 1.0) -> tuple[tuple, list]:
    cx, cy = center
    left, top, right, bottom = (d * stride for d in DIST[stride])
    box = ((cx - left) / scale, (cy - top) / scale, (left + right) / scale, (top + bottom) / scale)
    landmarks = [((cx + ox * stride) / scale, (cy + oy * stride) / scale) for ox, oy in KPS]
    return box, landmarks


def square(canvas: np.ndarray, x: int, y: int, size: int, channel: int) -> None:
    canvas[y:y + size, x:x + size, channel] = 255


@pytest.mark.parametrize("batched", [False, True])
def test_scrfd_decodes_each_stride_and_anchor_to_its_place(scrfd_models, batched):
    detector = ScrfdDetector(scrfd_models[batched])
    assert detector.input_size == (640, 640) and detector.strides == STRIDES and detector.num_anchors == 2
    rgb = np.zeros((480, 640, 3), dtype=np.uint8)  # letterboxed at scale 1
    square(rgb, 80, 40, 8, 0)  # stride 8 cell (10, 5)
    square(rgb, 320, 160, 16, 1)  # stride 16 cell (20, 10), second anchor
    square(rgb, 512, 320, 32, 2)  # stride 32 cell (16, 10)
    faces = detector.detect(rgb)
    assert len(faces) == 3
    found = {round(f.box[2]): f for f in faces}
    for stride, center in ((8, (80, 40)), (16, (320, 160)), (32, (512, 320))):
        box, landmarks = expected_face(stride, center)
        face = found[round(box[2])]
        assert face.box == pytest.approx(box, abs=1e-3)
        np.testing.assert_allclose(face.landmarks, landmarks, atol=1e-3)
        assert face.score > 0.99
    assert [f.area for f in faces] == sorted((f.area for f in faces), reverse=True)


@pytest.mark.parametrize("size, corner", [((1280, 960), (1024, 640)), ((320, 1280), (128, 1024))])
def test_scrfd_maps_letterboxed_detections_back(scrfd_models, size, corner):
    # Both photos are shrunk by exactly 2 into the 640x640 input (wide and tall branch).
    rgb = np.zeros((size[1], size[0], 3), dtype=np.uint8)
    square(rgb, *corner, 64, 2)
    faces = ScrfdDetector(scrfd_models[False]).detect(rgb)
    box, landmarks = expected_face(32, (corner[0] / 2, corner[1] / 2), scale=0.5)
    assert len(faces) == 1
    assert faces[0].box == pytest.approx(box, abs=1e-3)
    np.testing.assert_allclose(faces[0].landmarks, landmarks, atol=1e-3)


def test_scrfd_filters_by_score_and_suppresses_overlaps(scrfd_models):
    detector = ScrfdDetector(scrfd_models[False])
    assert detector.detect(np.zeros((480, 640, 3), dtype=np.uint8)) == []
    rgb = np.zeros((480, 640, 3), dtype=np.uint8)
    square(rgb, 160, 160, 16, 0)  # four stride-8 cells fire, their boxes overlap heavily
    faces = detector.detect(rgb)
    assert len(faces) == 1
    assert faces[0].box[:2] == pytest.approx((160 - 32, 160 - 36), abs=1e-3)  # the first in score order
    assert ScrfdDetector(scrfd_models[False], nms_threshold=1.0).detect(rgb).__len__() == 4


def test_scrfd_behind_the_selfie_check_and_factory(scrfd_models):
    detector = create_detector("scrfd", scrfd_models[True])
    assert isinstance(detector, ScrfdDetector)
    # A tiny model finds no face in a real-looking photo: the check says so, it does not crash.
    noise = np.random.default_rng(1).integers(60, 200, (300, 400, 3), dtype=np.uint8)
    assert rejection(encode_jpeg(Image.fromarray(noise)), detector).code == "selfie.no_face"
    with pytest.raises(ValueError, match="unknown face detector"):
        create_detector("haar", scrfd_models[True])


def test_scrfd_refuses_an_export_without_keypoints(tmp_path):
    path = export_tiny_scrfd(tmp_path / "no_kps.onnx", outputs=6)
    with pytest.raises(ValueError, match="6 outputs"):
        ScrfdDetector(path)
