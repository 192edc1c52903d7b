"""Reference photos and their captions, read for the device stage (NumPy and Pillow only).

``load_images`` turns a folder (or a list of files) into ``[3, R, R]`` float32 arrays in
``[-1, 1]``, the layout the VAE encoder takes. Every photo goes through the same steps:

1. full decode (``img.load()``), so a truncated or corrupt file is caught here and not
   half-way through a run; Pillow's ``LOAD_TRUNCATED_IMAGES`` is never enabled;
2. EXIF orientation applied (``ImageOps.exif_transpose``), so phone photos stand upright;
3. colour: transparency (RGBA, LA, PA, palette or single-colour ``tRNS``) is composited on
   white; greyscale, palette, CMYK and YCbCr are converted by Pillow; 16-bit greyscale
   (``I;16*``, and ``I`` holding 0..65535 as 16-bit PNG/TIFF give) is *scaled* to 8 bits
   (``v / 257``), not clipped; other ``I`` and ``F`` data are scaled from their range;
4. centre crop to a square, resized to ``resolution`` with Lanczos (one pass, the crop is
   the resize box).

Nothing is skipped silently: every file that cannot be used is collected and reported in
one :class:`~zoodip_edge.errors.UserError` line, e.g.
``cannot read 2 image(s) in photos/: a.jpg (truncated), b.png (not an image)``.

``load_captions`` reads an optional JSON object ``{"file name": "a photo of {} on a sofa"}``
where ``{}`` marks where the learned token goes.
"""

from __future__ import annotations

import json
import os
import re
import stat
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from zoodip_edge.errors import UserError

__all__ = ["IMAGE_EXTENSIONS", "MAX_PIXELS", "load_images", "load_rgb_images", "load_captions"]

#: File name endings taken from a folder (compared case-insensitively).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")

#: Largest image accepted, in pixels (8192 x 8192). Larger files are refused before decoding:
#: a photo never needs more, and a small file claiming more is a decompression bomb.
MAX_PIXELS = 8192 * 8192

#: A captions file is a few lines per photo; one larger than this is not one.
MAX_CAPTIONS_BYTES = 16 << 20

_PIL_SIZE = re.compile(r"\((\d+) pixels\)")


class _Bad(Exception):
    """One file's problem, phrased as the short reason shown in parentheses."""


def load_images(
    source: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    resolution: int,
    *,
    max_pixels: int = MAX_PIXELS,
) -> list[tuple[str, np.ndarray]]:
    """Read reference photos as ``(file name, float32 [3, resolution, resolution] in [-1, 1])``.

    ``source`` is a folder (its files whose names end in one of :data:`IMAGE_EXTENSIONS`,
    any case; hidden files and subfolders are ignored), a single image file, or a list of
    image files (taken whatever their extension). The result is sorted by file name. Two files with the same
    name (from different folders) are refused, since captions are keyed by file name.

    Raises :class:`UserError` for a missing path, a folder without images, or any file that
    is empty, not an image, truncated/corrupt, unreadable, or larger than ``max_pixels``;
    all bad files are named in the one message.
    """
    resolution = _resolution(resolution)
    return _read_all(source, lambda rgb: _square(rgb, resolution), max_pixels)


def _resolution(resolution: int) -> int:
    if isinstance(resolution, bool) or not isinstance(resolution, (int, np.integer)) or resolution < 1:
        raise ValueError(f"resolution must be a positive integer, got {resolution!r}")
    return int(resolution)


def load_images_and_sizes(
    source: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    resolution: int,
    *,
    max_pixels: int = MAX_PIXELS,
) -> list[tuple[str, np.ndarray, tuple[int, int]]]:
    """As :func:`load_images`, with each photo's (height, width) as read, upright: what SDXL's
    micro-conditioning (:func:`sdxl_time_ids`) describes."""
    resolution = _resolution(resolution)
    both = _read_all(source, lambda rgb: (_square(rgb, resolution), (rgb.height, rgb.width)), max_pixels)
    return [(name, img, size) for name, (img, size) in both]


def sdxl_time_ids(size: tuple[int, int], resolution: int) -> np.ndarray:
    """SDXL's six ``time_ids`` for a photo of ``size`` (height, width) prepared as :func:`load_images`
    prepares it: original height and width, the crop's top and left, the target size.

    The crop offsets are in pixels of the photo scaled so its short side is ``resolution``, SDXL's
    training convention (resize, then crop), since this preprocessing scales before it crops.
    diffusers' SDXL textual inversion also passes each photo's size and crop, but crops a
    ``resolution`` window from the unscaled photo, so its offsets are in the photo's own pixels.
    """
    h, w = size
    side = min(h, w)
    scale = resolution / side
    return np.array([h, w, round((h - side) // 2 * scale), round((w - side) // 2 * scale), resolution, resolution],
                    np.float32)


def load_rgb_images(
    source: str | os.PathLike[str] | Sequence[str | os.PathLike[str]], *, max_pixels: int = MAX_PIXELS
) -> list[tuple[str, Image.Image]]:
    """The same files, checks and messages as :func:`load_images`, as upright RGB PIL images at
    their own size (what ``evaluate`` scores)."""
    return _read_all(source, lambda rgb: rgb.copy(), max_pixels)


def _read_all(source, finish, max_pixels: int) -> list:
    where, files = _list_sources(source)

    bad: list[str] = []
    out: list = []
    for label, path in files:
        try:
            out.append((path.name, _load_one(path, finish, max_pixels)))
        except _Bad as e:
            bad.append(f"{label} ({e})")
    if bad:
        raise UserError(f"cannot read {len(bad)} image(s){where}: {', '.join(bad)}")

    names = [name for name, _ in out]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise UserError(
            f"image file names must be unique (captions are keyed by name): {', '.join(dupes)}"
        )
    out.sort(key=lambda item: item[0])
    return out


def load_captions(path: str | os.PathLike[str], image_names: Sequence[str]) -> dict[str, str]:
    """Read ``{"<image file name>": "<caption with {}>"}`` and return the captions of ``image_names``.

    Each caption must contain ``{}`` where the learned token goes (every ``{}`` is replaced
    by the token; other braces are kept as they are, so use ``str.replace``, not
    ``str.format``). Keys that name no image are ignored. Raises :class:`UserError` when the
    file is missing or not a JSON object, when a caption is not a string or lacks ``{}``, or
    when images have no caption (all of them named).
    """
    p = Path(path)
    if p.exists() and not p.is_dir():
        from ..files import check_regular_file

        check_regular_file(p, "captions file")
        if p.stat().st_size > MAX_CAPTIONS_BYTES:
            raise UserError(f"captions file {p} is {p.stat().st_size} bytes; a captions file is at most {MAX_CAPTIONS_BYTES}")
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"captions file not found: {p}") from None
    except IsADirectoryError:
        raise UserError(f"captions file is a folder: {p}") from None
    except PermissionError:
        raise UserError(f"cannot read captions file {p}: permission denied") from None
    except UnicodeDecodeError:
        raise UserError(f"captions file {p} is not UTF-8 text") from None
    except OSError as e:
        raise UserError(f"cannot read captions file {p}: {e.strerror or e}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(
            f"captions file {p} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})"
        ) from None
    if not isinstance(data, dict):
        raise UserError(
            f"captions file {p} must hold a JSON object mapping image file name to caption, "
            f"not a {type(data).__name__ if data is not None else 'null'}"
        )

    missing = [n for n in image_names if n not in data]
    if missing:
        raise UserError(
            f"captions file {p} has no caption for {len(missing)} image(s): {', '.join(missing)}"
        )
    not_str = [n for n in image_names if not isinstance(data[n], str)]
    if not_str:
        raise UserError(f"captions file {p}: caption is not a string for: {', '.join(not_str)}")
    no_slot = [n for n in image_names if "{}" not in data[n]]
    if no_slot:
        raise UserError(
            f"captions file {p}: caption lacks '{{}}' (where the token goes) for: {', '.join(no_slot)}"
        )
    return {n: data[n] for n in image_names}


# --------------------------------------------------------------------------- internals


def _list_sources(source) -> tuple[str, list[tuple[str, Path]]]:
    """Return (" in <folder>" or "", [(label for messages, path)])."""
    if isinstance(source, (str, os.PathLike)):
        folder = Path(source)
        if not folder.exists():
            raise UserError(f"image path not found: {folder}")
        if not folder.is_dir():
            return "", [(str(folder), folder)]
        try:
            entries = sorted(folder.iterdir())
        except PermissionError:
            raise UserError(f"cannot list image folder {folder}: permission denied") from None
        files = [
            (e.name, e)
            for e in entries
            if not e.name.startswith(".")
            and e.suffix.lower() in IMAGE_EXTENSIONS
            and not e.is_dir()
        ]
        if not files:
            raise UserError(
                f"no images in {folder} (looked for {', '.join(IMAGE_EXTENSIONS)}, any case)"
            )
        return f" in {folder}", files

    if isinstance(source, (bytes, bytearray)):
        raise TypeError("source must be a folder path or a list of image paths, not bytes")
    paths = [Path(s) for s in source]
    if not paths:
        raise UserError("no images given")
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise UserError(f"image file(s) not found: {', '.join(missing)}")
    folders = [str(p) for p in paths if p.is_dir()]
    if folders:
        raise UserError(f"expected image files, got folder(s): {', '.join(folders)}")
    return "", [(str(p), p) for p in paths]


def _load_one(path: Path, finish: Callable[[Image.Image], Any], max_pixels: int) -> Any:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise _Bad("missing") from None
    except PermissionError:
        raise _Bad("permission denied") from None
    except OSError as e:  # a symbolic link loop, a name too long, an I/O error
        raise _Bad((e.strerror or type(e).__name__).lower()) from None
    if not stat.S_ISREG(st.st_mode):  # a FIFO or device would block or never end
        raise _Bad("not a regular file")
    if st.st_size == 0:
        raise _Bad("empty file")

    # Pillow warns above Image.MAX_IMAGE_PIXELS and raises above twice that; turn the warning
    # into an error for this call only (catch_warnings restores the filters on exit).
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(path) as img:
                w, h = img.size
                if w * h > max_pixels:
                    raise _Bad(f"too large ({w}×{h} pixels)")
                try:
                    img.load()
                except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
                    raise _Bad(f"too large ({w}×{h} pixels)") from e
                except Exception as e:  # noqa: BLE001 - any decoder failure is a bad file
                    raise _Bad(_decode_reason(e)) from e
                # crop and resize before the file closes: closing frees the decoded pixels
                return finish(_to_rgb(_upright(img)))
        except _Bad:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise _Bad(f"too large ({_bomb_size(e)} pixels)") from e
        except UnidentifiedImageError:
            raise _Bad("not an image") from None
        except PermissionError:
            raise _Bad("permission denied") from None
        except FileNotFoundError:
            raise _Bad("missing") from None
        except IsADirectoryError:
            raise _Bad("is a folder") from None
        except MemoryError:
            raise _Bad("out of memory while decoding") from None
        except Exception as e:  # noqa: BLE001 - header parse errors of all kinds
            raise _Bad(_decode_reason(e)) from e



def _square(rgb: Image.Image, resolution: int) -> np.ndarray:
    """Centre crop to a square and resize (one Lanczos pass), as float32 [3, R, R] in [-1, 1]."""
    w, h = rgb.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    square = rgb.resize(
        (resolution, resolution),
        Image.Resampling.LANCZOS,
        box=(left, top, left + side, top + side),
        reducing_gap=3.0 if side >= 3 * resolution else None,
    )
    arr = np.asarray(square, dtype=np.float32)  # [R, R, 3] in 0..255
    arr = arr / np.float32(127.5) - np.float32(1.0)
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def _bomb_size(e: BaseException) -> str:
    """"W×H" from Pillow's refusal (its check sees the size; the message only the product)."""
    tb = e.__traceback__
    while tb is not None:
        size = tb.tb_frame.f_locals.get("size") if tb.tb_next is None else None
        if isinstance(size, tuple) and len(size) == 2 and all(isinstance(v, int) for v in size):
            return f"{size[0]}×{size[1]}"
        tb = tb.tb_next
    m = _PIL_SIZE.search(str(e))
    return m.group(1) if m else "too many"


def _decode_reason(e: BaseException) -> str:
    msg = str(e).strip()
    low = msg.lower()
    if isinstance(e, EOFError) or "truncated" in low or "premature end" in low:
        return "truncated"
    first = msg.splitlines()[0] if msg else type(e).__name__
    return f"corrupt: {first[:80]}"


def _upright(img: Image.Image) -> Image.Image:
    """Apply the EXIF orientation; a broken EXIF block leaves the pixels as stored."""
    try:
        out = ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001 - bad EXIF must not reject a good photo
        return img
    return img if out is None else out


def _to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB, with transparency composited on white and 16/32-bit data scaled."""
    mode = img.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        return Image.fromarray(_wide_to_u8(img), "L").convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
    if has_alpha:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode == "RGB":
        return img
    try:
        return img.convert("RGB")
    except (ValueError, OSError) as e:
        raise _Bad(f"unsupported colour mode {mode}") from e


def _wide_to_u8(img: Image.Image) -> np.ndarray:
    """16-bit, 32-bit integer or float greyscale to 0..255 by scaling, never by clipping."""
    a = np.asarray(img)
    if img.mode.startswith("I;16"):
        v = a.astype(np.float32) / np.float32(257.0)  # 65535 -> 255 exactly
    else:
        a = a.astype(np.float64)
        finite = a[np.isfinite(a)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
        if img.mode == "I" and lo >= 0 and hi <= 65535:
            v = a / 257.0  # what 16-bit PNG and TIFF decode to
        elif img.mode == "F" and lo >= 0 and hi <= 1.0:
            v = a * 255.0
        elif img.mode == "F" and lo >= 0 and hi <= 255.0:
            v = a
        else:
            v = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
        v = np.nan_to_num(v, nan=0.0, posinf=255.0, neginf=0.0)
    return np.clip(np.rint(v), 0, 255).astype(np.uint8)
