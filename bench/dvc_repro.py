"""The whole pipeline under DVC: a full `dvc repro` (wall, per-stage time, peak RSS of any stage)
then a no-op `dvc repro`.

    python bench/dvc_repro.py
    python bench/dvc_repro.py --dataset digits          # smoke run
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common


def main() -> None:
    p = common.parser(__doc__)
    p.add_argument("--noop-runs", type=int, default=3)
    args = p.parse_args()
    work = common.workdir(args)
    dvc = str(Path(sys.executable).parent / "dvc")
    env = common.env()
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    stage_times: dict[str, float] = {}
    started = time.perf_counter()
    last_stage, last_time = None, started
    with subprocess.Popen(
        [dvc, "repro", "--force"], cwd=work, env=env, stdout=subprocess.PIPE, text=True
    ) as proc:
        for line in proc.stdout:  # "Running stage 'train':" marks where each stage starts
            if match := re.match(r"Running stage '(\w+)'", line):
                now = time.perf_counter()
                if last_stage:
                    stage_times[last_stage] = now - last_time
                last_stage, last_time = match.group(1), now
    full = time.perf_counter() - started
    if last_stage:
        stage_times[last_stage] = time.perf_counter() - last_time
    if proc.returncode:
        sys.exit(f"dvc repro failed ({proc.returncode})")
    peak = common.peak_child_rss_mib()
    noop = [common.run([dvc, "repro"], work) for _ in range(args.noop_runs)]
    rows = [{"measure": "full dvc repro wall", "value": full, "unit": "s"}]
    rows += [{"measure": f"  stage {k}", "value": v, "unit": "s"} for k, v in stage_times.items()]
    rows += [
        {"measure": "peak RSS (largest stage)", "value": peak, "unit": "MiB"},
        {"measure": "no-op dvc repro (median)", "value": common.median(noop), "unit": "s"},
    ]
    common.report(f"dvc_repro_{args.dataset}", rows, {"noop": noop, "command": " ".join(sys.argv)})


if __name__ == "__main__":
    main()
