"""A digit drawn as the pictures people send to `predict`: a photographed page (evenly or unevenly
lit, sensor noise and JPEG), a web canvas's export, a tight crop, a thicker or thinner pen. The
tests (tests/test_predict_inputs.py) and the recognition benchmark (bench/recognition.py) render
real digits through these, so both measure the same conditions.

Ink is a float image in [0, 1] (0 paper, 1 full pen), as the datasets store digits (light on
dark); pages are float grey levels 0..255.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.infra.files import atomic_path

PAPER, SHADE, PEN = 245.0, 190.0, 80.0  # grey levels: paper, its shaded side, a pen in a photo


def page(height: int, width: int, shade: float = SHADE, direction: int = 0) -> np.ndarray:
    """A photographed page: PAPER on one side darkening linearly to `shade` on the other,
    left to right (direction 0), top to bottom (1) or corner to corner (2; others modulo 3)."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    across = [xs / (width - 1), ys / (height - 1), (xs / (width - 1) + ys / (height - 1)) / 2]
    return PAPER + (shade - PAPER) * across[direction % 3]


def ink_on(paper: np.ndarray, ink: np.ndarray, top: int, left: int) -> np.ndarray:
    """`ink` laid on the page at (top, left), the pen (PEN) darkening it."""
    out = paper.copy()
    h, w = ink.shape
    region = out[top : top + h, left : left + w]
    out[top : top + h, left : left + w] = region + (PEN - region) * ink
    return out


def digit_ink(digit: np.ndarray, size: int) -> np.ndarray:
    """A dataset digit ((H, W) light on dark in [0, 1]: 8x8 digits, 28x28 MNIST) scaled smoothly
    (bicubic) to size x size ink in [0, 1]."""
    from PIL import Image

    image = Image.fromarray(np.round(digit * 255).astype(np.uint8), mode="L")
    return np.asarray(image.resize((size, size), Image.Resampling.BICUBIC), np.float32) / 255


def pen(ink: np.ndarray, change: int) -> np.ndarray:
    """The same strokes drawn with a pen `change` pixels wider on each side (a grey dilation;
    negative: thinner, a grey erosion)."""
    from PIL import Image, ImageFilter

    if change == 0:
        return ink
    image = Image.fromarray(np.round(ink * 255).astype(np.uint8), mode="L")
    size = 2 * abs(change) + 1
    grown = ImageFilter.MaxFilter(size) if change > 0 else ImageFilter.MinFilter(size)
    return np.asarray(image.filter(grown), np.float32) / 255


def tight_crop(ink: np.ndarray, paper: float = PAPER) -> np.ndarray:
    """A page cut to the digit's strokes (ink above 0.5), dark ink on `paper`: the digit touches
    all four edges."""
    rows = np.flatnonzero((ink > 0.5).any(axis=1))
    cols = np.flatnonzero((ink > 0.5).any(axis=0))
    inked = ink[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    return paper - inked * (paper - 30)


def photo_noise(pixels: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """A camera's sensor noise on a page: Gaussian, `sigma` grey levels."""
    return pixels + rng.normal(0, sigma, pixels.shape).astype(np.float32)


def save_grey(pixels: np.ndarray, path: Path, **options) -> Path:
    """Grey levels (clipped to 0..255) as an 8-bit grey image file (format from the suffix;
    `options` to Pillow's save, e.g. quality=75 for a JPEG)."""
    from PIL import Image

    grey = np.round(np.clip(pixels, 0, 255)).astype(np.uint8)
    with atomic_path(path) as tmp:  # keeps the suffix, which names the format
        Image.fromarray(grey, mode="L").save(tmp, **options)
    return path


def canvas_export(ink: np.ndarray, path: Path, colour: tuple[int, int, int]) -> Path:
    """A web canvas export: strokes of one colour, the drawing only in the alpha channel, on a
    fully transparent (0, 0, 0, 0) background, as PNG."""
    from PIL import Image

    alpha = np.round(ink * 255).astype(np.uint8)
    rgba = np.zeros((*ink.shape, 4), dtype=np.uint8)
    rgba[alpha > 0, :3] = colour
    rgba[..., 3] = alpha
    with atomic_path(path) as tmp:
        Image.fromarray(rgba, mode="RGBA").save(tmp)
    return path
