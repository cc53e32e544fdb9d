"""One sweep of N train jobs under each Hydra launcher: basic (one after the other, all cores
per job), joblib (2 processes, 1 thread each) and ray_cluster (a new local Ray instance, 1 CPU
per job). Wall time of the whole `-m` command, and its ratio to the basic launcher's.

    python bench/launchers.py                       # MNIST, 4 jobs x 2 epochs
    python bench/launchers.py --dataset digits      # smoke run
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

LAUNCHERS = {
    "basic": [],
    "joblib": ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "threads=1"],
    "ray_cluster": ["hydra/launcher=ray_cluster"],
}


def main() -> None:
    p = common.parser(__doc__)
    p.add_argument("--jobs", type=int, default=4)
    p.add_argument("--epochs", type=int, default=2)
    args = p.parse_args()
    work = common.workdir(args)
    widths = ",".join(str(512 + i) for i in range(args.jobs))  # distinct configs, same cost
    walls = {}
    for name, extra in LAUNCHERS.items():
        sweep = [
            *extra,
            f"epochs={args.epochs}",
            f"width={widths}",
            f"hydra.sweep.dir=multirun/bench-{name}",
        ]
        walls[name] = common.run(common.stage_cmd("train", "-m", *sweep), work)
    rows = [
        {"launcher": name, "seconds": wall, "vs basic": wall / walls["basic"]}
        for name, wall in walls.items()
    ]
    common.report(f"launchers_{args.dataset}", rows, {"command": " ".join(sys.argv)})


if __name__ == "__main__":
    main()
