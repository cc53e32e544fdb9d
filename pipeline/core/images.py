"""An image file as a model's input: the digit found, cropped, scaled and centred the way MNIST
was made (the MNIST database's description, yann.lecun.com/exdb/mnist: each digit fitted into a
20x20 box keeping its aspect ratio, then placed by its centre of mass at the centre of the 28x28
canvas).

Any ordinary image works (PNG, JPEG, BMP, GIF, TIFF, WebP, PGM/PPM: FORMATS; any size; dark ink
on light paper or light on dark; colour, grey, or transparent, which is composited on white).
The result is grey, light digit on black, pixels in [0, 1], flattened: side*side float32 values
for a side x side canvas.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from pipeline.infra.errors import InputError

# The formats read (Pillow's names) and their file suffixes. Pillow is asked to try only these:
# left to itself it opens dozens more, whatever a file's name, and hands some to other programs
# (EPS and PDF to Ghostscript, a PostScript interpreter).
FORMATS = {
    "PNG": (".png",),
    "JPEG": (".jpg", ".jpeg"),
    "BMP": (".bmp",),
    "GIF": (".gif",),
    "TIFF": (".tif", ".tiff"),
    "WEBP": (".webp",),
    "PPM": (".pgm", ".ppm"),
}
IMAGE_SUFFIXES = tuple(suffix for suffixes in FORMATS.values() for suffix in suffixes)
MAX_MEGAPIXELS = 50
# A digit is at least this many grey levels (of 255) darker or lighter than the background;
# less is a blank page, sensor noise or JPEG artefacts.
MIN_CONTRAST = 32.0
# Of the ink's peak: pixels above BOX_LEVEL bound the digit; those below NOISE_LEVEL are zeroed.
BOX_LEVEL = 0.15
NOISE_LEVEL = 0.05
# The cropped digit is kept at most this many pixels on its longer side until the model's canvas
# size is known (far above any model's, so the final resize is unaffected in practice).
CROP_CAP = 256
# The box the digit is fitted into, by canvas side. MNIST (28): 20x20, the digit's centre of
# mass at the centre. scikit-learn's 8x8 digits fill their canvas's full height (all 1,797 of
# them are 8 rows tall), so there the box is the whole canvas. Other sides: MNIST's proportion.
DIGIT_BOX = {28: 20, 8: 8}


def _to_grey(image) -> np.ndarray:
    """float32 grey levels 0..255; transparency composited on white."""
    from PIL import Image

    if image.mode.startswith("I;16"):
        return np.asarray(image, dtype=np.float32) / np.float32(257)
    if image.mode in ("I", "F"):
        grey = np.asarray(image, dtype=np.float32)
        peak = float(grey.max(initial=0))
        return grey * np.float32(255 / peak) if peak > 255 else grey
    if image.has_transparency_data:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return np.asarray(image.convert("L"), dtype=np.float32)


def read_grey(path: Path, max_megapixels: float = MAX_MEGAPIXELS) -> np.ndarray:
    """Decode an image file (first frame, EXIF orientation applied) into float32 grey 0..255.

    Only FORMATS are tried, whatever the file's name. Raises InputError for an empty file, a file
    that is not an image in one of them, a damaged image, and an image over `max_megapixels`
    (checked from the header, before any pixels are decoded)."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    if path.stat().st_size == 0:
        raise InputError(f"{path}: empty file (0 bytes), not an image")
    too_large = (
        f"{path}: image too large (the limit is {max_megapixels:g} megapixels); downscale it first"
    )
    try:
        with warnings.catch_warnings():
            # Our own limit is lower than Pillow's warning threshold; the error is ours to raise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path, formats=list(FORMATS)) as image:
                width, height = image.size
                if width * height > max_megapixels * 1e6:
                    raise InputError(
                        f"{path}: image too large ({width}x{height} = "
                        f"{width * height / 1e6:.1f} megapixels, the limit is "
                        f"{max_megapixels:g}); downscale it first"
                    )
                image.load()
                return _to_grey(ImageOps.exif_transpose(image))
    except Image.DecompressionBombError:
        raise InputError(too_large) from None
    except UnidentifiedImageError:
        raise InputError(
            f"{path}: not an image in a format predict reads ({', '.join(FORMATS)}); other "
            "formats are not opened"
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:  # damaged/truncated images
        raise InputError(f"{path}: cannot read the image: {err}") from None


def _resize(pixels: np.ndarray, width: int, height: int) -> np.ndarray:
    """Resize a float image: area averaging when shrinking (how scikit-learn's digits were
    made from their 32x32 bitmaps, and no ringing), Lanczos when enlarging a small crop."""
    from PIL import Image

    image = Image.fromarray(np.ascontiguousarray(pixels, dtype=np.float32), mode="F")
    shrinking = width <= image.width and height <= image.height
    resample = Image.Resampling.BOX if shrinking else Image.Resampling.LANCZOS
    return np.asarray(image.resize((width, height), resample), dtype=np.float32)


def locate_digit(grey: np.ndarray, name: str = "image") -> np.ndarray:
    """The digit as light ink on black in [0, 1], cropped to its bounding box (longer side at
    most CROP_CAP pixels). The background is what the border pixels mostly are: a light one is
    inverted, then subtracted. Raises InputError (naming `name`) if there is no digit."""
    border = np.concatenate([grey[0], grey[-1], grey[:, 0], grey[:, -1]])
    background = float(np.median(border))
    if background > 127.5:
        grey, background = 255 - grey, 255 - background
    ink = np.clip(grey - background, 0, None)
    peak = float(ink.max(initial=0))
    if peak < MIN_CONTRAST:
        raise InputError(f"{name}: no digit found (the image is blank or has no contrast)")
    ink /= peak
    rows = np.flatnonzero((ink > BOX_LEVEL).any(axis=1))
    cols = np.flatnonzero((ink > BOX_LEVEL).any(axis=0))
    crop = ink[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    crop = np.where(crop < NOISE_LEVEL, 0, crop).astype(np.float32)
    height, width = crop.shape
    if max(height, width) > CROP_CAP:
        scale = CROP_CAP / max(height, width)
        crop = _resize(crop, max(1, round(width * scale)), max(1, round(height * scale)))
    return crop


def digit_box(side: int) -> int:
    """The square the digit is fitted into on a side x side canvas."""
    return DIGIT_BOX.get(side, max(1, round(side * 20 / 28)))


def to_model_input(crop: np.ndarray, side: int) -> np.ndarray:
    """Fit a located digit into digit_box(side) keeping its aspect ratio, place its centre of
    mass at the centre of a side x side canvas; returns the flattened canvas, float32 in [0, 1]."""
    box = digit_box(side)
    height, width = crop.shape
    scale = box / max(height, width)
    new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
    patch = np.clip(_resize(crop, new_w, new_h), 0, None)
    if patch.sum() <= 0:  # shrunk to nothing (cannot happen for a located digit; be safe)
        patch = np.ones_like(patch)
    patch /= patch.max()
    mass = patch.sum()
    ys, xs = np.indices(patch.shape, dtype=np.float64) + 0.5
    centre_y = float((ys * patch).sum() / mass)
    centre_x = float((xs * patch).sum() / mass)
    top = min(max(round(side / 2 - centre_y), 0), side - new_h)
    left = min(max(round(side / 2 - centre_x), 0), side - new_w)
    canvas = np.zeros((side, side), dtype=np.float32)
    canvas[top : top + new_h, left : left + new_w] = patch
    return canvas.reshape(-1)


def prepare_image(path: Path, side: int) -> np.ndarray:
    """An image file as the model's input: side*side float32 pixels in [0, 1]."""
    return to_model_input(locate_digit(read_grey(path), str(path)), side)
