"""Per-job overhead of a Hydra sweep: `pipeline.train -m epochs=1,1,1,1` wall time, against one
single-job run and the jobs' own fit times.

    python bench/sweep_overhead.py
    python bench/sweep_overhead.py --dataset digits      # smoke run
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common


def main() -> None:
    p = common.parser(__doc__)
    p.add_argument("--jobs", type=int, default=4)
    args = p.parse_args()
    work = common.workdir(args)
    single = common.run(common.stage_cmd("train", "epochs=1"), work)
    single_fit = json.loads((work / "runs" / "train.json").read_text())["timing"]["fit_seconds"]
    sweep_dir = work / "multirun" / "bench"
    sweep = common.run(
        common.stage_cmd(
            "train", "-m", "epochs=" + ",".join(["1"] * args.jobs), f"hydra.sweep.dir={sweep_dir}"
        ),
        work,
    )
    fits = [
        json.loads((sweep_dir / str(i) / "runs" / "train.json").read_text())["timing"][
            "fit_seconds"
        ]
        for i in range(args.jobs)
    ]
    # What each job adds beyond its own training, once the process is up (start-up is paid once).
    per_job = (sweep - (single - single_fit) - sum(fits)) / args.jobs
    rows = [
        {"measure": "single run wall", "seconds": single},
        {"measure": "single run fit", "seconds": single_fit},
        {"measure": f"sweep of {args.jobs} wall", "seconds": sweep},
        {"measure": "sweep fits (sum)", "seconds": sum(fits)},
        {"measure": "per-job overhead", "seconds": per_job},
        {
            "measure": f"sweep wall - {args.jobs} x single fit, per job",
            "seconds": (sweep - args.jobs * single_fit) / args.jobs,
        },
    ]
    common.report(f"sweep_overhead_{args.dataset}", rows, {"command": " ".join(sys.argv)})


if __name__ == "__main__":
    main()
