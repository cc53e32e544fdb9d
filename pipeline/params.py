"""Write (or check) params.yaml as the composition of conf/, exactly as `dvc exp run` does.

conf/ is the single source of truth. params.yaml is generated from it, by DVC itself on every
`dvc exp run` (Hydra composition is enabled in .dvc/config) and by `python -m pipeline.params`
after editing conf/, before a plain `dvc repro` (which never recomposes: iterative/dvc#10750).
`--check` exits non-zero when the two disagree; the test suite runs it.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from pipeline.infra.files import atomic_path
from pipeline.infra.stage import run_command

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
PARAMS_FILE = CONF_DIR.parent / "params.yaml"


def compose_params(overrides: list[str] | None = None) -> str:
    """params.yaml's text for conf/ plus overrides, composed by DVC's own code path."""
    from dvc.utils.hydra import compose_and_dump

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "params.yaml"
        # Same arguments as `dvc exp run`: config dir conf/, plugins looked up from the repo root.
        compose_and_dump(out, str(CONF_DIR), None, "config", str(CONF_DIR.parent), overrides or [])
        return out.read_text(encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.params", description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if params.yaml is stale")
    parser.add_argument(
        "overrides",
        nargs="*",
        help="Hydra overrides, e.g. dataset=digits epochs=2 (not with --check)",
    )
    args = parser.parse_args(argv)
    if args.check and args.overrides:
        parser.error("--check compares params.yaml with conf/ as it is: give no overrides")
    expected = compose_params(args.overrides)
    current = PARAMS_FILE.read_text(encoding="utf-8") if PARAMS_FILE.exists() else ""
    if args.check:
        if current != expected:
            print(
                "params.yaml does not match conf/. Run `python -m pipeline.params` to regenerate "
                "it (or use `dvc exp run`, which recomposes it).",
                file=sys.stderr,
            )
            return 1
        print("params.yaml matches conf/")
        return 0
    if current != expected:
        with atomic_path(PARAMS_FILE) as tmp:
            tmp.write_text(expected, encoding="utf-8")
        print(f"wrote {PARAMS_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main))
