"""The seed experiment's accuracy on full-size data: test accuracy over several seeds, the
5-fold CV mean ± std, seconds per epoch, and the `model=cnn` accuracy.

    python bench/accuracy.py                                   # MNIST from ../shared/data/mnist
    python bench/accuracy.py --dataset fashion_mnist --mirror /usr/share/datasets/fashion-mnist/
    python bench/accuracy.py --dataset digits --seeds 1 --no-crossval --no-cnn   # smoke run
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common


def main() -> None:
    p = common.parser(__doc__)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--no-crossval", action="store_true")
    p.add_argument("--no-cnn", action="store_true")
    args = p.parse_args()
    work = common.workdir(args)
    # conf/ plus overrides (not params.yaml), so config groups such as model=cnn can be chosen
    base = [f"dataset={args.dataset}"]
    train = [sys.executable, "-m", "pipeline.train", *base]

    def train_metrics(*overrides: str) -> dict:
        common.run([*train, *overrides], work)
        metrics = json.loads((work / "metrics" / "train.json").read_text())
        return {**metrics, **json.loads((work / "runs" / "train.json").read_text())["timing"]}

    rows = []
    for seed in range(1, args.seeds + 1):
        m = train_metrics(f"seed={seed}")
        rows.append(
            {
                "run": f"mlp seed={seed}",
                "test_accuracy": m["test_accuracy"],
                "s_per_epoch": m["seconds_per_epoch"],
            }
        )
    if rows:
        accuracies = [r["test_accuracy"] for r in rows]
        mean_epoch = statistics.mean(r["s_per_epoch"] for r in rows)
        rows.append(
            {
                "run": "mlp mean",
                "test_accuracy": statistics.mean(accuracies),
                "s_per_epoch": mean_epoch,
            }
        )
    if not args.no_crossval:
        common.run([sys.executable, "-m", "pipeline.crossval", *base], work)
        cv = json.loads((work / "metrics" / "crossval.json").read_text())
        rows.append(
            {
                "run": f"crossval mean (± {cv['accuracy_std']:.4f})",
                "test_accuracy": cv["accuracy_mean"],
                "s_per_epoch": float("nan"),
            }
        )
    if not args.no_cnn:
        m = train_metrics("model=cnn")
        rows.append(
            {
                "run": "cnn seed=42",
                "test_accuracy": m["test_accuracy"],
                "s_per_epoch": m["seconds_per_epoch"],
            }
        )
    common.report(f"accuracy_{args.dataset}", rows, {"command": " ".join(sys.argv)})


if __name__ == "__main__":
    main()
