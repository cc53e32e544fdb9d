"""Repair the MLflow store: close the runs whose process died without ending them.

    python -m pipeline.runs close-dead [--tracking-uri URI] [--experiment NAME] [--host NAME]
        [--dry-run]

A process killed with `kill -9` (the OOM killer, `docker kill`) cannot end its MLflow run, which
then stays RUNNING. Every stage start already marks KILLED the RUNNING runs of its experiment
whose process is gone on this host; this does the same for every experiment of the store, on
demand, and lists the RUNNING runs it cannot judge (started on another host, in a container, or
before runs recorded their process). `--host NAME` closes those of a host you know is gone.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from pipeline.infra.errors import TrackingError, first_line
from pipeline.infra.reconcile import HOST_TAG, PID_TAG, close, find_dead_runs
from pipeline.infra.stage import run_command
from pipeline.infra.tracking import check_store, store_uri


def close_dead(
    tracking_uri: str | None,
    experiment: str | None = None,
    hosts: Sequence[str] = (),
    dry_run: bool = False,
) -> list[str]:
    """Mark KILLED the RUNNING runs of `experiment` (default: every experiment) in the store
    whose process is gone, folds with their parent; returns the lines to print: one per closed
    run and its folds, then one per RUNNING run left alone. Raises TrackingError for a store or
    experiment that does not exist or cannot be used."""
    import mlflow

    uri = store_uri(tracking_uri)
    check_store(uri, "name the store with --tracking-uri or MLFLOW_TRACKING_URI")
    try:
        client = mlflow.MlflowClient(tracking_uri=uri)
        if experiment is None:
            ids = [e.experiment_id for e in client.search_experiments()]
        elif (found := client.get_experiment_by_name(experiment)) is not None:
            ids = [found.experiment_id]
        else:
            raise TrackingError(f"no experiment {experiment!r} in {uri}")
        dead, left = find_dead_runs(client, ids, gone_hosts=hosts, this_host_only=False)
        lines = []
        for found in dead:
            if not dry_run:
                close(client, found)
            lines.append(f"{'would mark' if dry_run else 'marked'} {found.describe()} KILLED")
    except TrackingError:
        raise
    except Exception as err:  # mlflow raises many types for a bad store
        raise TrackingError(f"cannot repair the runs in {uri}: {first_line(err)}") from None
    for run in left:
        tags = run.data.tags
        where = f"pid {tags[PID_TAG]} on {tags[HOST_TAG]}" if HOST_TAG in tags else "no process"
        lines.append(
            f"left RUNNING: run {run.info.run_id} ({tags.get('stage', 'run')}, {where} recorded): "
            "cannot tell from here whether it still runs"
        )
    if any(line.startswith("left") for line in lines):
        lines.append("close the runs of a host you know is gone with --host NAME")
    verb = "would close" if dry_run else "closed"
    lines.append(f"{verb} {len(dead)} run set(s) whose process is gone; left {len(left)} in {uri}")
    return lines


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pipeline.runs", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    closing = commands.add_parser(
        "close-dead",
        help="mark KILLED the RUNNING runs whose process is gone (folds with their parent)",
    )
    closing.add_argument(
        "--tracking-uri",
        help="MLflow store (default: MLFLOW_TRACKING_URI, else the project's sqlite:///mlflow.db)",
    )
    closing.add_argument("--experiment", help="only this experiment (default: all of them)")
    closing.add_argument(
        "--host",
        action="append",
        default=[],
        metavar="NAME",
        help="also close the RUNNING runs recorded on host NAME, which you know is gone "
        "(e.g. a killed container); repeatable",
    )
    closing.add_argument("--dry-run", action="store_true", help="list, change nothing")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)

    def close_and_print() -> None:
        for line in close_dead(args.tracking_uri, args.experiment, args.host, args.dry_run):
            print(line)

    return run_command(close_and_print)


if __name__ == "__main__":
    sys.exit(main())
