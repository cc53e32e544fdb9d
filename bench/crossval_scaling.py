"""Cross-validation wall time: 5 folds x 5 epochs, and how it scales with the number of folds.

python bench/crossval_scaling.py --folds 2,3,5
python bench/crossval_scaling.py --dataset digits --folds 2,3     # smoke run
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common


def main() -> None:
    p = common.parser(__doc__)
    p.add_argument("--folds", default="2,3,5")
    p.add_argument("--epochs", type=int, default=5)
    args = p.parse_args()
    work = common.workdir(args)
    rows = []
    for folds in (int(f) for f in args.folds.split(",")):
        cmd = common.stage_cmd("crossval", f"folds={folds}", f"epochs={args.epochs}")
        wall = common.run(cmd, work)
        # each fold trains on (folds-1)/folds of the data: normalise to full-training-set epochs
        epochs_of_data = folds * args.epochs * (folds - 1) / folds
        rows.append(
            {
                "folds": folds,
                "epochs": args.epochs,
                "wall_s": wall,
                "s_per_full_data_epoch": wall / epochs_of_data,
            }
        )
    common.report(f"crossval_scaling_{args.dataset}", rows, {"command": " ".join(sys.argv)})


if __name__ == "__main__":
    main()
