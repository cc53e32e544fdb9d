"""What the pipeline costs over bare Keras: `python -m pipeline.train` (MLflow on, sqlite store)
against bench/bare_keras.py on the same prepared arrays and epochs, alternated A/B.

    python bench/pipeline_overhead.py --runs 5
    python bench/pipeline_overhead.py --dataset digits --runs 2     # smoke run
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common


def main() -> None:
    p = common.parser(__doc__)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--epochs", type=int, default=5)
    args = p.parse_args()
    work = common.workdir(args)
    bare_script = str(Path(__file__).parent / "bare_keras.py")
    bare_cmd = [sys.executable, bare_script, "data/prepared", str(args.epochs)]
    pipeline_cmd = common.stage_cmd("train", f"epochs={args.epochs}")
    bare, pipeline = [], []
    for _ in range(args.runs):
        bare.append(common.run(bare_cmd, work))
        pipeline.append(common.run(pipeline_cmd, work))
    rows = [
        {"variant": "bare keras", "median_s": common.median(bare), "runs": bare},
        {"variant": "pipeline.train", "median_s": common.median(pipeline), "runs": pipeline},
    ]
    ratio = common.median(pipeline) / common.median(bare)
    print(f"pipeline / bare = {ratio:.3f}")
    common.report(
        f"pipeline_overhead_{args.dataset}",
        [{k: v for k, v in r.items() if k != "runs"} for r in rows],
        {"ratio": ratio, "raw": rows, "command": " ".join(sys.argv)},
    )


if __name__ == "__main__":
    main()
