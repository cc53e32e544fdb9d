"""An image file as a model's input: the digit found, cropped, scaled and centred the way MNIST
was made (the MNIST database's description, yann.lecun.com/exdb/mnist: each digit fitted into a
20x20 box keeping its aspect ratio, then placed by its centre of mass at the centre of the 28x28
canvas).

Any ordinary image works (PNG, JPEG, BMP, GIF, TIFF, WebP, PGM/PPM: FORMATS; any size; dark ink
on light paper or light on dark; colour, grey, 16-bit, float, or transparent). A photo's paper
may be unevenly lit: the background is a smooth surface fitted to the image's border, not one
level; a camera's noise is measured on that border and smoothed away before the digit is
cropped. The result is grey, light digit on black, pixels in [0, 1], flattened: side*side
float32 values for a side x side canvas.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
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
# A border pixel this many grey levels above the fitted background is ink, whatever the noise.
MIN_TRIM = 3.0
# Of the ink's peak: pixels above BOX_LEVEL bound the digit; those below NOISE_LEVEL are zeroed.
BOX_LEVEL = 0.15
NOISE_LEVEL = 0.05
# Noise: a pixel bounds the digit only above this many robust standard deviations of the paper's
# noise (Gaussian: 3e-7 of paper pixels pass), and those within 3 of them are zeroed.
NOISE_SIGMAS = 5.0
# The cropped digit is kept at most this many pixels on its longer side until the model's canvas
# size is known (far above any model's, so the final resize is unaffected in practice).
CROP_CAP = 256
# The box the digit is fitted into, by canvas side. MNIST (28): 20x20, the digit's centre of
# mass at the centre. scikit-learn's 8x8 digits fill their canvas's full height (all 1,797 of
# them are 8 rows tall), so there the box is the whole canvas. Other sides: MNIST's proportion.
DIGIT_BOX = {28: 20, 8: 8}


def _composited(image) -> np.ndarray:
    """Grey levels 0..255 of an image with transparency, composited on white paper; or on black
    when every visible pixel is nearly one light colour (a spread under MIN_CONTRAST, weighted
    by opacity): then the drawing lives only in the alpha channel, as in a web canvas's export
    of white strokes on a transparent background, and white paper would hide it."""
    la = np.asarray(image.convert("RGBA").convert("LA"), dtype=np.float32)
    grey, alpha = la[..., 0], la[..., 1] / np.float32(255)
    paper = np.float32(255)
    weight = float(alpha.sum())
    if weight > 0:
        mean = float((grey * alpha).sum()) / weight
        spread = (float(((grey - mean) ** 2 * alpha).sum()) / weight) ** 0.5
        if spread < MIN_CONTRAST and mean > 127.5:
            paper = np.float32(0)
    return grey * alpha + paper * (1 - alpha)


def _lightness_to_grey(lightness: np.ndarray) -> np.ndarray:
    """CIELAB lightness L* (stored 0..255 for 0..100) -> the sRGB grey level 0..255 of the
    neutral colour with that lightness (CIE 1976 L* inverted to luminance Y, then the sRGB
    transfer function, IEC 61966-2-1)."""
    star = lightness * np.float32(100 / 255)
    luminance = np.where(star > 8, ((star + 16) / 116) ** 3, star / np.float32(903.3))
    srgb = np.where(
        luminance <= 0.0031308, 12.92 * luminance, 1.055 * luminance ** (1 / 2.4) - 0.055
    )
    return (np.clip(srgb, 0, 1) * 255).astype(np.float32)


def _to_grey(image) -> np.ndarray:
    """float32 grey levels 0..255, whatever the mode: 16-bit scaled from 0..65535, 32-bit
    integers by their peak when over 255, floats in [0, 1] by 255, CIELAB by its lightness
    (_lightness_to_grey), transparency composited (_composited)."""
    if image.mode.startswith("I;16"):
        return np.asarray(image, dtype=np.float32) / np.float32(257)
    if image.mode in ("I", "F"):
        grey = np.asarray(image, dtype=np.float32)
        peak = float(grey.max(initial=0))
        if image.mode == "F" and peak <= 1:
            return grey * np.float32(255)
        return grey * np.float32(255 / peak) if peak > 255 else grey
    if image.mode == "LAB":
        return _lightness_to_grey(np.asarray(image.getchannel("L"), dtype=np.float32))
    if image.has_transparency_data:
        return _composited(image)
    return np.asarray(image.convert("L"), dtype=np.float32)


def read_grey(path: Path, max_megapixels: float = MAX_MEGAPIXELS) -> np.ndarray:
    """Decode an image file (first frame, EXIF orientation applied) into float32 grey 0..255.

    Only FORMATS are tried, whatever the file's name. Raises InputError for an empty file, a file
    that is not an image in one of them, a damaged image, and an image over `max_megapixels`
    (checked from the header, before any pixels are decoded)."""
    if path.stat().st_size == 0:
        raise InputError(f"{path}: empty file (0 bytes), not an image")
    return _decode(path, str(path), max_megapixels)


def decode_grey(data: bytes, name: str, max_megapixels: float = MAX_MEGAPIXELS) -> np.ndarray:
    """read_grey for an image's bytes (a served request's image), `name` naming it in errors."""
    if not data:
        raise InputError(f"{name}: empty (0 bytes), not an image")
    return _decode(io.BytesIO(data), name, max_megapixels)


def _decode(source: Path | io.BytesIO, name: str, max_megapixels: float) -> np.ndarray:
    from PIL import Image, ImageOps, UnidentifiedImageError

    too_large = (
        f"{name}: image too large (the limit is {max_megapixels:g} megapixels); downscale it first"
    )
    try:
        with warnings.catch_warnings():
            # Our own limit is lower than Pillow's warning threshold; the error is ours to raise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(source, formats=list(FORMATS)) as image:
                width, height = image.size
                if width * height > max_megapixels * 1e6:
                    raise InputError(
                        f"{name}: image too large ({width}x{height} = "
                        f"{width * height / 1e6:.1f} megapixels, the limit is "
                        f"{max_megapixels:g}); downscale it first"
                    )
                image.load()
                return _to_grey(ImageOps.exif_transpose(image))
    except Image.DecompressionBombError:
        raise InputError(too_large) from None
    except UnidentifiedImageError:
        raise InputError(
            f"{name}: not an image in a format predict reads ({', '.join(FORMATS)}); other "
            "formats are not opened"
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:  # damaged/truncated images
        raise InputError(f"{name}: cannot read the image: {err}") from None


def _resize(pixels: np.ndarray, width: int, height: int) -> np.ndarray:
    """Resize a float image: area averaging when shrinking (how scikit-learn's digits were
    made from their 32x32 bitmaps, and no ringing), Lanczos when enlarging a small crop."""
    from PIL import Image

    image = Image.fromarray(np.ascontiguousarray(pixels, dtype=np.float32), mode="F")
    shrinking = width <= image.width and height <= image.height
    resample = Image.Resampling.BOX if shrinking else Image.Resampling.LANCZOS
    return np.asarray(image.resize((width, height), resample), dtype=np.float32)


def _spread(values: np.ndarray) -> float:
    """A robust standard deviation: 1.4826 x the median absolute deviation (equal to the standard
    deviation for normal noise, unmoved by a minority of outliers)."""
    return 1.4826 * float(np.median(np.abs(values - np.median(values))))


def _background(grey: np.ndarray) -> np.ndarray:
    """The background's level under every pixel of a light-ink-on-dark image, float32.

    A page lit unevenly (a shadow's soft edge, a gradient, a vignette) varies smoothly, so its
    border describes it, where one level, the border's median, cannot (issue #17: a page going
    from 245 to 190 made the shaded side pass as ink). This is the quadratic surface
    a + bx + cy + dx^2 + ey^2 + fxy fitted by least squares to the border pixels, leaving out,
    refit after refit, those above it by more than three robust standard deviations (_spread)
    of the fitted ones' residuals, or MIN_TRIM levels: ink reaching the border. Inside, it is
    kept within the fitted levels' range widened by that range on each side (no wild
    extrapolation). When one level describes the fitted border pixels as well (their spread
    within half a grey level of the surface's), the background is that level, their median:
    an evenly lit image is treated exactly as before."""
    height, width = grey.shape
    y = np.linspace(0, 1, height, dtype=np.float32)
    x = np.linspace(0, 1, width, dtype=np.float32)
    ys = np.concatenate([np.zeros(width), np.ones(width), y, y])
    xs = np.concatenate([x, x, np.zeros(height), np.ones(height)])
    values = np.concatenate([grey[0], grey[-1], grey[:, 0], grey[:, -1]]).astype(np.float64)
    terms = np.stack([np.ones_like(xs), xs, ys, xs**2, ys**2, xs * ys], axis=1).astype(np.float64)
    fitted = values <= np.median(values) + MIN_CONTRAST / 2
    for _ in range(20):
        coef = np.linalg.lstsq(terms[fitted], values[fitted], rcond=None)[0]
        residuals = values - terms @ coef
        spread = _spread(residuals[fitted])
        again = residuals <= max(3 * spread, MIN_TRIM)
        if (again == fitted).all() or again.sum() < len(coef):
            break
        fitted = again
    paper = values[fitted]
    if _spread(paper) <= spread + 0.5:
        return np.full(grey.shape, np.median(paper), dtype=np.float32)
    a, b, c, d, e, f = coef.astype(np.float32)
    surface = (a + c * y + e * y**2)[:, None] + (b * x + d * x**2 + f * y[:, None] * x)
    low, high = float(paper.min()), float(paper.max())
    return np.clip(surface, 2 * low - high, 2 * high - low)


@dataclass(frozen=True)
class Located:
    """A digit found in an image: `crop` light ink on black in [0, 1], cropped to its bounding
    box; `edges` the image's edges it touches ("top", "bottom", "left", "right")."""

    crop: np.ndarray
    edges: tuple[str, ...] = ()

    @property
    def warning(self) -> str | None:
        """A digit touching one edge, or two that meet, may be cut off by the image's frame; one
        spanning the whole height or width is a tight crop (no warning)."""
        touched = set(self.edges)
        if not touched or {"top", "bottom"} <= touched or {"left", "right"} <= touched:
            return None
        names = " and ".join(self.edges)
        plural = "s" if len(self.edges) > 1 else ""
        return f"the digit touches the {names} edge{plural} of the image: it may be cut off"


def _noise(values: np.ndarray) -> float:
    """The pixel noise's standard deviation along an image's border: the robust spread of the
    differences between neighbouring border pixels over sqrt(2) (each difference carries two
    pixels' noise). Smooth paper, a lighting gradient and the soft edges of strokes reaching the
    border differ little from pixel to pixel, so they do not count as noise."""
    edges = (values[0], values[-1], values[:, 0], values[:, -1])
    return _spread(np.concatenate([np.diff(edge) for edge in edges])) / np.sqrt(2)


def locate_digit(grey: np.ndarray, name: str = "image") -> Located:
    """The digit as light ink on black in [0, 1], cropped to its bounding box (longer side at
    most CROP_CAP pixels), and the image edges it touches. A light background (the border's
    median over 127.5) is inverted; the background (_background) is subtracted. Noise over one
    grey level (_noise, along the border) is smoothed with a 1-pixel
    Gaussian, and only pixels NOISE_SIGMAS spreads above the paper bound the digit. Raises
    InputError (naming `name`) if there is no digit."""
    border = np.concatenate([grey[0], grey[-1], grey[:, 0], grey[:, -1]])
    if float(np.median(border)) > 127.5:
        grey = 255 - grey
    # A photo's sensor noise (and JPEG's): a noisy pixel passing as ink would stretch the
    # digit's box to the page's edges.
    residual = grey - _background(grey)
    noise = _noise(residual)
    if noise > 1:  # smoothed away first (a 1-pixel Gaussian keeps the strokes)
        from scipy.ndimage import gaussian_filter

        residual = gaussian_filter(residual, 1.0)
        # What is left: white noise drops to 1/(2 sqrt(pi)) = 0.28 of itself; JPEG's noise,
        # correlated, less. Halved, to err on the side of a box too tight (it only then loses the
        # faintest edge) rather than one stretched by noise. (Measured after smoothing it would
        # vanish: neighbours then differ little.)
        noise /= 2
    ink = np.clip(residual, 0, None)
    peak = float(ink.max(initial=0))
    if peak < MIN_CONTRAST:
        raise InputError(f"{name}: no digit found (the image is blank or has no contrast)")
    # Capped so that noise never hides the strokes' cores.
    box_level = min(max(BOX_LEVEL, NOISE_SIGMAS * noise / peak), 0.5)
    noise_level = min(max(NOISE_LEVEL, 3 * noise / peak), 0.25)
    ink /= peak
    rows = np.flatnonzero((ink > box_level).any(axis=1))
    cols = np.flatnonzero((ink > box_level).any(axis=0))
    height, width = ink.shape
    edges = tuple(
        edge
        for edge, touches in (
            ("top", rows[0] == 0),
            ("bottom", rows[-1] == height - 1),
            ("left", cols[0] == 0),
            ("right", cols[-1] == width - 1),
        )
        if touches
    )
    crop = ink[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    crop = np.where(crop < noise_level, 0, crop).astype(np.float32)
    height, width = crop.shape
    if max(height, width) > CROP_CAP:
        scale = CROP_CAP / max(height, width)
        crop = _resize(crop, max(1, round(width * scale)), max(1, round(height * scale)))
    return Located(crop=crop, edges=edges)


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
    return to_model_input(locate_digit(read_grey(path), str(path)).crop, side)
