"""The reference result as a seed mean, and two models on one test set (issue #19).

Trains the default config over several seeds (`train -m seed=0,...`), compares the sweep as one
config over seeds (mean test accuracy, 95% Student-t interval, per-seed values), then trains
`model=cnn` at seed 0 and compares it with the mlp's seed-0 run by McNemar's exact test.

    python bench/seed_compare.py                       # MNIST from ../shared/data/mnist (CPU-heavy)
    python bench/seed_compare.py --dataset digits --seeds 3   # smoke run, a minute or two
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common


def main() -> None:
    p = common.parser(__doc__)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="TensorFlow threads (0 = all cores)")
    args = p.parse_args()
    work = common.workdir(args)
    uri = f"sqlite:///{work / 'mlflow.db'}"
    base = [f"dataset={args.dataset}", f"threads={args.threads}", f"tracking.uri={uri}"]
    seeds = ",".join(str(s) for s in range(args.seeds))
    train = [sys.executable, "-m", "pipeline.train"]
    sweep = [f"seed={seeds}", f"hydra.sweep.dir={work / 'multirun' / 'seeds'}"]
    common.run([*train, "-m", *base, *sweep], work)  # Hydra's -m before the overrides
    common.run([*train, *base, "model=cnn", "seed=0"], work)
    cnn_run = json.loads((work / "runs" / "train.json").read_text())["run_id"]

    sys.path.insert(0, str(work))  # the work dir's copy of the code
    from pipeline.compare import run_compare, run_pair

    over_seeds, _ = run_compare(
        sweep=str(work / "multirun" / "seeds"), tracking_uri=uri, output=None
    )
    s, mlp = over_seeds.best.summary, over_seeds.best.run
    pair, _ = run_pair(mlp.seed_runs[0], cnn_run, tracking_uri=uri, output=None, log=False)
    r = pair.result
    rows = [
        {"run": f"mlp seed={seed}", "test_accuracy": acc}
        for (_, seed), acc in sorted(mlp.folds.items())
    ]
    rows.append({"run": f"mlp mean of {s.n} seeds, 95% CI [{s.ci_low:.4f}, {s.ci_high:.4f}]",
                 "test_accuracy": s.mean})  # fmt: skip
    rows.append({"run": "cnn seed=0", "test_accuracy": pair.b.accuracy})
    meta = {
        "command": " ".join(sys.argv),
        "seed_mean": s.mean,
        "seed_std": s.std,
        "seed_ci": [s.ci_low, s.ci_high],
        "mcnemar": {
            "a": "mlp seed=0",
            "b": "cnn seed=0",
            "both_right": r.both_right,
            "only_a_right": r.only_a_right,
            "only_b_right": r.only_b_right,
            "both_wrong": r.both_wrong,
            "p_value": r.p_value,
        },
    }
    common.report(f"seed_compare_{args.dataset}", rows, meta)
    print(f"McNemar mlp vs cnn: {r.only_a_right} vs {r.only_b_right} discordant, p={r.p_value:.3g}")


if __name__ == "__main__":
    main()
