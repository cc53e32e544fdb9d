"""Shared helpers for the benchmarks: a project work dir with prepared data, timing, results."""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "bench" / "results"
SHARED_MNIST = ROOT.parent / "shared" / "data" / "mnist"


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument(
        "--dataset",
        default="mnist",
        help="mnist (full size, from --mirror) or digits (tiny smoke run)",
    )
    p.add_argument(
        "--mirror",
        default=str(SHARED_MNIST),
        help="directory or URL holding the MNIST IDX files (default: ../shared/data/mnist)",
    )
    p.add_argument("--workdir", default=None, help="reuse this work dir (default: a new one)")
    return p


def env() -> dict[str, str]:
    return {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "TF_CPP_MIN_LOG_LEVEL": "2"}


def run(cmd: list[str], cwd: Path, check: bool = True) -> float:
    """Run a command; returns its wall time in seconds."""
    started = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, env=env(), check=check, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def peak_child_rss_mib() -> float:
    """Largest resident set of any finished child process so far (Linux: KiB -> MiB)."""
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def workdir(args: argparse.Namespace, prepare: bool = True) -> Path:
    """A copy of the project's current code, conf and dvc.yaml as its own git repo, with
    prepared data (unless `prepare` is false). An existing work dir gets the current code and
    keeps its data."""
    target = Path(args.workdir or f"/tmp/digit-bench-{args.dataset}")
    prepared = (target / "data" / "prepared" / "train.npz").exists()
    if not prepared and target.exists():
        shutil.rmtree(target)
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    for name in files:
        if name.startswith(("tests/", "bench/")) or not (ROOT / name).is_file():
            continue
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, target / name)
    overrides = [f"dataset={args.dataset}"]
    if args.dataset != "digits" and args.mirror:
        if not Path(args.mirror).exists() and "://" not in args.mirror:
            sys.exit(f"no MNIST mirror at {args.mirror}: pass --mirror or --dataset digits")
        overrides.append(f"dataset.mirrors=[{args.mirror}]")
    run([sys.executable, "-m", "pipeline.params", *overrides], target)
    git = ["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost"]
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], [*git, "commit", "-qm", "bench"]):
        run(cmd, target, check=False)  # nothing to commit on a reused work dir is fine
    if prepare and not prepared:
        for stage in ("fetch", "preprocess"):
            run(stage_cmd(stage), target)
    return target


def stage_cmd(stage: str, *overrides: str) -> list[str]:
    """A stage as `dvc repro` runs it: reading the work dir's params.yaml through Hydra."""
    return [sys.executable, "-m", f"pipeline.{stage}", "--config-dir", ".", "--config-name",
            "params", *overrides]  # fmt: skip


def median(values: list[float]) -> float:
    return statistics.median(values)


def report(name: str, rows: list[dict], meta: dict) -> Path:
    """Print rows as a table and write them with meta to bench/results/<name>.json."""
    keys = list(rows[0])
    widths = [max(len(k), *(len(_fmt(r[k])) for r in rows)) for k in keys]
    print("  ".join(k.ljust(w) for k, w in zip(keys, widths, strict=True)))
    for r in rows:
        print("  ".join(_fmt(r[k]).ljust(w) for k, w in zip(keys, widths, strict=True)))
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    out = RESULTS_DIR / f"{name}.json"
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n", encoding="utf-8")
    print(f"-> {out}")
    return out


def _fmt(value: object) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)
