"""How well `predict` recognises real MNIST test digits drawn as the pictures people send (issue
#17): accuracy per condition, for the seed MLP and `model=cnn`, through predict's own code path
(pipeline.predict.predict_files on image files).

    python bench/recognition.py --mirror /work/shared/data/mnist [--per-condition 200]
    python bench/recognition.py --dataset digits --per-condition 40     # smoke run, no MNIST

Each model is trained once with `python -m pipeline.train dataset=<d> model=<m> threads=1` in the
bench's work dir (kept under <workdir>/bench-models/ for later runs). The conditions are rendered
by pipeline.core.renders, the same code the tests use: the digit (bicubic to 56 px) in ink on a
120x160 page at a place that varies, the test images taken in order, the same digits in every
condition. Without the MNIST files it says so and exits 0.
"""

from __future__ import annotations

import logging
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

from pipeline.core.renders import (
    PAPER,
    canvas_export,
    digit_ink,
    ink_on,
    page,
    pen,
    photo_noise,
    save_grey,
    tight_crop,
)

INK_SIZE = 56
PAGE = (120, 160)


def _on_page(ink: np.ndarray, i: int, shade: float = PAPER) -> np.ndarray:
    """The ink on a page (shaded from PAPER to `shade`, the direction varying with i)."""
    return ink_on(page(*PAGE, shade, i), ink, 20 + i % 40, 20 + (i * 7) % 80)


def _photo(sigma: float) -> Callable:
    def render(digit: np.ndarray, i: int, path: Path) -> Path:
        rng = np.random.default_rng(i)
        pixels = photo_noise(_on_page(digit_ink(digit, INK_SIZE), i), sigma, rng)
        return save_grey(pixels, path.with_suffix(".jpg"), quality=75)

    return render


def _shadow(shade: float) -> Callable:
    def render(digit: np.ndarray, i: int, path: Path) -> Path:
        return save_grey(_on_page(digit_ink(digit, INK_SIZE), i, shade), path)

    return render


def _pen(change: int) -> Callable:
    def render(digit: np.ndarray, i: int, path: Path) -> Path:
        return save_grey(_on_page(pen(digit_ink(digit, INK_SIZE), change), i), path)

    return render


# name -> render(digit, index, a .png path) -> the image file written (a photo: as .jpg)
CONDITIONS: dict[str, Callable] = {
    "clean paper": _shadow(PAPER),
    "shadow 245->190": _shadow(190.0),
    "shadow 245->150": _shadow(150.0),
    "shadow 245->110": _shadow(110.0),
    "canvas export (white on transparent)": lambda d, i, p: canvas_export(
        digit_ink(d, 2 * INK_SIZE), p.with_suffix(".png"), (255, 255, 255)
    ),
    "photo, noise sigma 8, JPEG q75": _photo(8.0),
    "photo, noise sigma 20, JPEG q75": _photo(20.0),
    "tight crop": lambda d, i, p: save_grey(tight_crop(digit_ink(d, INK_SIZE)), p),
    "thick pen (+2 px)": _pen(2),
    "thin pen (-1 px)": _pen(-1),
}


def trained_model(work: Path, dataset: str, name: str) -> Path:
    """The work dir's model `name` trained on `dataset` (trained now if not kept from before)."""
    kept = work / "bench-models" / f"{dataset}-{name}.keras"
    if not kept.exists():
        kept.parent.mkdir(exist_ok=True)
        overrides = [f"dataset={dataset}", f"model={name}", "threads=1"]
        common.run([sys.executable, "-m", "pipeline.train", *overrides], work)
        shutil.copyfile(work / "models" / "model.keras", kept)
    return kept


def accuracy(model: Path, files: list[Path], labels: np.ndarray) -> tuple[float, int]:
    """(accuracy, inputs predict could not classify) through predict's code path."""
    from pipeline.infra.inference import Prediction
    from pipeline.predict import predict_files

    results = predict_files(files, model)
    found = np.array([r.digit if isinstance(r, Prediction) else -1 for r in results])
    return float((found == labels).mean()), int((found < 0).sum())


def main() -> None:
    p = common.parser(__doc__)
    p.add_argument("--per-condition", type=int, default=200, help="test digits per condition")
    p.add_argument("--models", default="mlp,cnn", help="model types, comma-separated")
    args = p.parse_args()
    if args.dataset != "digits" and not Path(args.mirror).exists():
        print(f"skipped: no MNIST files at {args.mirror} (pass --mirror DIR, or --dataset digits)")
        return
    work = common.workdir(args)
    logging.getLogger("tensorflow").setLevel(logging.ERROR)  # retracing notes: a model per call
    from pipeline.core.data import load_split

    test = load_split(work / "data" / "prepared" / "test.npz")
    digits, labels = test.images[: args.per_condition], test.labels[: args.per_condition]
    models = {name: trained_model(work, args.dataset, name) for name in args.models.split(",")}
    rows = []
    with tempfile.TemporaryDirectory(prefix="recognition-") as scratch:
        for condition, render in CONDITIONS.items():
            folder = Path(scratch) / condition.replace(" ", "_").replace("/", "_")
            folder.mkdir()
            files = [render(d, i, folder / f"{i:04d}.png") for i, d in enumerate(digits)]
            row: dict = {"condition": condition}
            for name, model in models.items():
                row[name], row[f"{name} unread"] = accuracy(model, files, labels)
            rows.append(row)
    clean = rows[0]
    for row in rows:
        for name in models:
            row[f"{name} gap"] = row[name] - clean[name]
    meta = {
        "dataset": args.dataset,
        "per_condition": len(digits),
        "models": {name: str(path) for name, path in models.items()},
        "command": " ".join(sys.argv),
    }
    common.report(f"recognition-{args.dataset}", rows, meta)


if __name__ == "__main__":
    main()
