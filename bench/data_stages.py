"""Full-size fetch + preprocess: wall time and peak memory of each stage, in a fresh work dir.

python bench/data_stages.py --dataset fashion_mnist --mirror /usr/share/datasets/fashion-mnist/
python bench/data_stages.py                            # MNIST from ../shared/data/mnist
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common


def measured(cmd: list[str], cwd: Path) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of one command, run through a fresh Python wrapper so
    each stage's peak is its own."""
    wrapper = (
        "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    started = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", wrapper, *cmd],
        cwd=cwd,
        env=common.env(),
        check=True,
        capture_output=True,
        text=True,
    )
    return time.perf_counter() - started, int(out.stdout.split()[-1]) / 1024


def main() -> None:
    args = common.parser(__doc__).parse_args()
    target = Path(args.workdir or f"/tmp/digit-bench-data-{args.dataset}")
    shutil.rmtree(target, ignore_errors=True)
    args.workdir = str(target)
    work = common.workdir(args, prepare=False)  # code and conf only: the stages are timed here
    rows = []
    for stage in ("fetch", "preprocess"):
        wall, rss = measured(common.stage_cmd(stage), work)
        rows.append({"stage": stage, "wall_s": wall, "peak_rss_mib": rss})
    common.report(f"data_stages_{args.dataset}", rows, {"command": " ".join(sys.argv)})


if __name__ == "__main__":
    main()
