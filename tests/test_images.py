"""Reference photos and captions (zoodip_edge.runtime.images): Pillow-made files, well under a second."""

from __future__ import annotations

import json
import os
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from zoodip_edge.errors import UserError
from zoodip_edge.runtime.images import load_captions, load_images

RED = (255, 0, 0)
GREEN = (0, 255, 0)
BLUE = (0, 0, 255)


def one(path: Path, resolution: int = 32, **kw) -> np.ndarray:
    [(name, arr)] = load_images([path], resolution, **kw)
    assert name == path.name
    assert arr.dtype == np.float32 and arr.shape == (3, resolution, resolution)
    assert arr.min() >= -1.0 and arr.max() <= 1.0
    return arr


def to255(arr: np.ndarray) -> np.ndarray:
    """[3, H, W] in [-1, 1] back to [H, W, 3] in 0..255."""
    return (arr.transpose(1, 2, 0) + 1.0) * 127.5


def marked_square(size: int = 64) -> Image.Image:
    """White square with a red block in the top-left corner."""
    img = Image.new("RGB", (size, size), (255, 255, 255))
    img.paste(RED, (0, 0, size // 4, size // 4))
    return img


def is_red(px) -> bool:
    r, g, b = px
    return r > 200 and g < 60 and b < 60


# ------------------------------------------------------------------ good inputs


def test_folder_sorted_filtered_and_normalised(tmp_path):
    Image.new("RGB", (40, 40), GREEN).save(tmp_path / "b.png")
    Image.new("RGB", (40, 40), BLUE).save(tmp_path / "A.JPG", quality=95)  # case-insensitive ext
    Image.new("RGB", (40, 40), RED).save(tmp_path / "c.webp")
    Image.new("RGB", (40, 40), RED).save(tmp_path / ".hidden.png")  # hidden: ignored
    (tmp_path / "sub.png").mkdir()  # a folder named like an image: ignored
    Image.new("RGB", (40, 40), RED).save(tmp_path / "sub.png" / "inner.png")
    (tmp_path / "captions.json").write_text("{}")  # not an image extension: ignored
    (tmp_path / "notes.txt").write_text("hello")

    out = load_images(tmp_path, 16)
    assert [n for n, _ in out] == ["A.JPG", "b.png", "c.webp"]
    for _, arr in out:
        assert arr.dtype == np.float32 and arr.shape == (3, 16, 16)
        assert -1.0 <= arr.min() and arr.max() <= 1.0
    green = to255(out[1][1])
    assert np.allclose(green, [0, 255, 0], atol=1)

    # str path and an explicit list give the same
    listed = load_images([str(tmp_path / "c.webp"), tmp_path / "b.png"], 16)
    assert [n for n, _ in listed] == ["b.png", "c.webp"]
    assert np.array_equal(listed[0][1], out[1][1])


def test_exif_orientation_applied(tmp_path):
    # Orientation 6: the camera stored the picture rotated; viewers turn it 90° clockwise,
    # so the stored top-left corner is displayed top-right.
    exif = Image.Exif()
    exif[0x0112] = 6
    marked_square().save(tmp_path / "rot.jpg", exif=exif.tobytes(), quality=95)
    marked_square().save(tmp_path / "plain.jpg", quality=95)

    rot = to255(one(tmp_path / "rot.jpg"))
    assert is_red(rot[2, 29]) and not is_red(rot[2, 2]), "red block should be top-right"
    assert not is_red(rot[29, 29]) and not is_red(rot[29, 2])

    plain = to255(one(tmp_path / "plain.jpg"))
    assert is_red(plain[2, 2]) and not is_red(plain[2, 29])


def test_rgba_composited_on_white(tmp_path):
    img = Image.new("RGBA", (32, 32), (0, 0, 0, 0))  # fully transparent black
    img.paste((255, 0, 0, 128), (0, 16, 32, 32))  # bottom half: half-transparent red
    img.save(tmp_path / "a.png")
    px = to255(one(tmp_path / "a.png", 32))
    assert np.allclose(px[2:12], 255, atol=1), "transparent must read as white, not black"
    assert np.allclose(px[20:30], [255, 127, 127], atol=2)


def test_palette_and_la_transparency(tmp_path):
    p = Image.new("P", (16, 16), 0)
    p.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    p.info["transparency"] = 0
    p.save(tmp_path / "p.png", transparency=0)
    Image.new("LA", (16, 16), (0, 0)).save(tmp_path / "la.png")
    Image.new("P", (16, 16), 0).save(tmp_path / "g.gif", transparency=0)
    for name in ("p.png", "la.png", "g.gif"):
        assert np.allclose(to255(one(tmp_path / name, 8)), 255, atol=1), name


def test_greyscale_to_rgb(tmp_path):
    Image.new("L", (20, 20), 64).save(tmp_path / "g.png")
    Image.new("1", (20, 20), 1).save(tmp_path / "bw.bmp")
    px = to255(one(tmp_path / "g.png", 8))
    assert np.allclose(px, 64, atol=0.5)
    assert np.allclose(to255(one(tmp_path / "bw.bmp", 8)), 255, atol=0.5)


def test_cmyk_jpeg_to_rgb(tmp_path):
    Image.new("CMYK", (32, 32), (0, 255, 255, 0)).save(tmp_path / "c.jpg", quality=95)  # red
    assert Image.open(tmp_path / "c.jpg").mode == "CMYK"
    px = to255(one(tmp_path / "c.jpg", 16))
    assert px[..., 0].min() > 230 and px[..., 1:].max() < 25


def test_16_bit_scaled_not_clipped(tmp_path):
    for value in (1000, 32768, 65535):
        Image.fromarray(np.full((24, 24), value, np.uint16)).save(tmp_path / f"v{value}.png")
        assert Image.open(tmp_path / f"v{value}.png").mode.startswith("I;16")
    got = {name: to255(arr) for name, arr in load_images(tmp_path, 8)}
    # v / 257 maps 0..65535 onto 0..255; clipping would turn all three white
    assert np.allclose(got["v1000.png"], round(1000 / 257), atol=0.5)
    assert np.allclose(got["v32768.png"], 128, atol=0.5)
    assert np.allclose(got["v65535.png"], 255, atol=0.5)


def test_32_bit_and_float_greyscale(tmp_path):
    Image.fromarray(np.full((8, 8), 0.5, np.float32), "F").save(tmp_path / "f.tif")
    Image.fromarray(np.full((8, 8), 65535, np.int32), "I").save(tmp_path / "i.tif")
    got = {name: to255(arr) for name, arr in load_images(tmp_path, 4)}
    assert np.allclose(got["f.tif"], 128, atol=1)
    assert np.allclose(got["i.tif"], 255, atol=0.5)


def test_center_crop_of_non_square(tmp_path):
    wide = Image.new("RGB", (96, 32), BLUE)
    wide.paste(GREEN, (32, 0, 64, 32))
    wide.paste(RED, (64, 0, 96, 32))
    wide.save(tmp_path / "wide.png")
    tall = Image.new("RGB", (30, 90), BLUE)
    tall.paste(GREEN, (0, 30, 30, 60))
    tall.save(tmp_path / "tall.png")
    for name in ("wide.png", "tall.png"):
        px = to255(one(tmp_path / name, 16))
        # only the middle third survives; Lanczos may tint the outermost pixels slightly
        assert np.allclose(px[2:14, 2:14], GREEN, atol=2), name
        assert (px[..., 1] > 200).all() and (px[..., 0] < 60).all() and (px[..., 2] < 60).all(), name


def test_tiny_image_upscaled(tmp_path):
    tiny = Image.new("RGB", (2, 2), (10, 20, 30))
    tiny.putpixel((1, 1), (240, 230, 220))
    tiny.save(tmp_path / "t.png")
    arr = one(tmp_path / "t.png", 64)
    px = to255(arr)
    # Lanczos rings near a hard edge, so only the broad picture is checked
    assert (px[0, 0] < 60).all() and (px[-1, -1] > 200).all()
    assert (px[:16, :16].mean(axis=(0, 1)) < 60).all() and (px[-16:, -16:].mean(axis=(0, 1)) > 200).all()


def test_large_downscale(tmp_path):
    Image.new("RGB", (1200, 900), GREEN).save(tmp_path / "big.jpg", quality=90)
    assert np.allclose(to255(one(tmp_path / "big.jpg", 64)), GREEN, atol=3)


# ------------------------------------------------------------------ bad inputs


def test_missing_path(tmp_path):
    with pytest.raises(UserError, match="not found.*nope"):
        load_images(tmp_path / "nope", 16)
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    with pytest.raises(UserError, match="not found.*gone.png"):
        load_images([tmp_path / "ok.png", tmp_path / "gone.png"], 16)


def test_empty_folder_and_folder_without_images(tmp_path):
    with pytest.raises(UserError, match="no images in"):
        load_images(tmp_path, 16)
    (tmp_path / "readme.txt").write_text("x")
    (tmp_path / ".secret.png").write_bytes(b"")
    with pytest.raises(UserError, match="no images in"):
        load_images(tmp_path, 16)
    with pytest.raises(UserError, match="no images"):
        load_images([], 16)


def truncated_jpeg(path: Path) -> None:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (128, 128, 3), dtype=np.uint8)).save(path, quality=90)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_bad_files_all_named_in_one_line(tmp_path):
    Image.new("RGB", (16, 16), GREEN).save(tmp_path / "good.png")
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.png").write_text("this is not a picture\n")
    truncated_jpeg(tmp_path / "cut.jpg")

    with pytest.raises(UserError) as ei:
        load_images(tmp_path, 16)
    msg = str(ei.value)
    assert "\n" not in msg
    assert msg.startswith("cannot read 3 image(s)")
    assert "empty.jpg (empty file)" in msg
    assert "text.png (not an image)" in msg
    assert "cut.jpg (truncated)" in msg
    assert "good.png" not in msg


def test_truncated_png(tmp_path):
    rng = np.random.default_rng(1)
    path = tmp_path / "cut.png"
    Image.fromarray(rng.integers(0, 255, (96, 96, 3), dtype=np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:3000])
    with pytest.raises(UserError, match=r"cut\.png \((truncated|corrupt)"):
        load_images([path], 16)


def png_claiming(path: Path, width: int, height: int) -> None:
    """A few-hundred-byte PNG whose IHDR claims width x height (1-bit greyscale)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    row = b"\x00" + b"\x00" * ((width + 7) // 8)
    idat = zlib.compress(row * 4)  # only a few rows: decoding would stop at the size check anyway
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def test_decompression_bomb_refused(tmp_path):
    png_claiming(tmp_path / "bomb.png", 20000, 20000)  # past Pillow's own hard limit
    png_claiming(tmp_path / "big.png", 9000, 9000)  # under Pillow's limit, over ours
    assert (tmp_path / "bomb.png").stat().st_size < 1000
    filters_before = list(warnings.filters)
    limit_before = Image.MAX_IMAGE_PIXELS
    with pytest.raises(UserError) as ei:
        load_images(tmp_path, 16)
    msg = str(ei.value)
    assert "bomb.png (too large (20000×20000 pixels))" in msg
    assert "big.png (too large (9000×9000 pixels))" in msg
    assert warnings.filters == filters_before, "warning filters must be restored"
    assert Image.MAX_IMAGE_PIXELS == limit_before, "Pillow's global limit must be left alone"


def test_pixel_limit_is_a_parameter(tmp_path):
    Image.new("RGB", (100, 100)).save(tmp_path / "a.png")
    with pytest.raises(UserError, match=r"a\.png \(too large \(100×100 pixels\)\)"):
        load_images(tmp_path, 16, max_pixels=5000)
    assert len(load_images(tmp_path, 16, max_pixels=10000)) == 1


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file(tmp_path):
    path = tmp_path / "locked.png"
    Image.new("RGB", (8, 8)).save(path)
    path.chmod(0)
    try:
        with pytest.raises(UserError, match=r"locked\.png \(permission denied\)"):
            load_images(tmp_path, 16)
    finally:
        path.chmod(0o644)


def test_unreadable_file_simulated(tmp_path, monkeypatch):
    """Same path as a real permission error (root ignores chmod): the open itself fails."""
    path = tmp_path / "locked.png"
    Image.new("RGB", (8, 8)).save(path)
    real_open = Image.open

    def deny(fp, *a, **kw):
        if Path(fp).name == "locked.png":
            raise PermissionError(13, "Permission denied", str(fp))
        return real_open(fp, *a, **kw)

    monkeypatch.setattr(Image, "open", deny)
    with pytest.raises(UserError, match=r"locked\.png \(permission denied\)"):
        load_images(tmp_path, 16)


def test_duplicate_names_refused(tmp_path):
    for sub in ("x", "y"):
        (tmp_path / sub).mkdir()
        Image.new("RGB", (8, 8)).save(tmp_path / sub / "dog.png")
    with pytest.raises(UserError, match="unique.*dog.png"):
        load_images([tmp_path / "x" / "dog.png", tmp_path / "y" / "dog.png"], 8)


def test_bad_resolution():
    with pytest.raises(ValueError):
        load_images(".", 0)


# ------------------------------------------------------------------ captions


def test_captions(tmp_path):
    path = tmp_path / "captions.json"
    path.write_text(json.dumps({"a.jpg": "a photo of {}", "b.jpg": "{} on a {sofa}", "extra.jpg": "no slot"}))
    assert load_captions(path, ["a.jpg", "b.jpg"]) == {"a.jpg": "a photo of {}", "b.jpg": "{} on a {sofa}"}


@pytest.mark.parametrize(
    "content, pattern",
    [
        ("{not json", r"not valid JSON \(.* line 1"),
        ('["a photo of {}"]', "must hold a JSON object.*not a list"),
        ('{"a.jpg": "a photo of {}"}', r"no caption for 2 image\(s\): b.jpg, c.jpg"),
        ('{"a.jpg": "{}", "b.jpg": "a dog", "c.jpg": "a {x}"}', r"lacks '\{\}'.*: b.jpg, c.jpg"),
        ('{"a.jpg": "{}", "b.jpg": 3, "c.jpg": "{}"}', "not a string for: b.jpg"),
    ],
)
def test_caption_errors(tmp_path, content, pattern):
    path = tmp_path / "captions.json"
    path.write_text(content)
    with pytest.raises(UserError, match=pattern) as ei:
        load_captions(path, ["a.jpg", "b.jpg", "c.jpg"])
    assert "\n" not in str(ei.value)


def test_captions_missing_file(tmp_path):
    with pytest.raises(UserError, match="captions file not found"):
        load_captions(tmp_path / "nope.json", ["a.jpg"])


@pytest.mark.parametrize("h, w, r", [(768, 1024, 1024), (1024, 768, 512), (300, 300, 64), (1000, 333, 96)])
def test_sdxl_time_ids_describe_the_crop_load_images_makes(h, w, r):
    """(original h, w, crop top, left, target h, w), the crop in pixels of the photo scaled so its short
    side is r: the centre square load_images keeps, offset as in the scaled photo."""
    from zoodip_edge.runtime.images import sdxl_time_ids

    ids = sdxl_time_ids((h, w), r)
    side = min(h, w)
    scaled = (round(h * r / side), round(w * r / side))
    assert list(ids[:2]) == [h, w] and list(ids[4:]) == [r, r]
    assert abs(ids[2] - (scaled[0] - r) / 2) <= 1 and abs(ids[3] - (scaled[1] - r) / 2) <= 1
    assert min(ids[2], ids[3]) == 0


def test_images_and_sizes_are_the_images_with_their_upright_sizes(tmp_path):
    from zoodip_edge.runtime.images import load_images, load_images_and_sizes

    Image.new("RGB", (50, 30), (200, 10, 10)).save(tmp_path / "a.png")
    Image.new("RGB", (20, 40), (10, 200, 10)).save(tmp_path / "b.png")
    both = load_images_and_sizes(tmp_path, 16)
    plain = load_images(tmp_path, 16)
    assert [(n, s) for n, _, s in both] == [("a.png", (30, 50)), ("b.png", (40, 20))]
    assert all(np.array_equal(x, y) for (_, x, _), (_, y) in zip(both, plain))
