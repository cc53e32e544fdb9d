"""Set-up for Ray worker processes that run sweep jobs (`hydra/launcher=ray_cluster`)."""

from __future__ import annotations

import os


def enter_project_dir() -> None:
    """Run jobs in the directory the sweep was launched from (PIPELINE_PROJECT_DIR, set by
    conf/hydra/launcher/ray_cluster.yaml), not the one `ray start` ran in: the stages read data/ and
    write multirun/ relative to it. On a cluster the project must be on a shared filesystem,
    mounted at the same path on every node."""
    project_dir = os.environ["PIPELINE_PROJECT_DIR"]
    if not os.path.isdir(project_dir):
        raise RuntimeError(
            f"this Ray node has no {project_dir}: launch the sweep from a directory every node "
            "mounts at the same path (docs/SCALING.md)"
        )
    os.chdir(project_dir)
