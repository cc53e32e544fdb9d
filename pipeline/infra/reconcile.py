"""What a process that died without cleaning up leaves behind, and how the next start repairs it.

`kill -9`, the OOM killer or a crash of the interpreter end a stage before `tracked_run` can end
its MLflow run or `atomic_path` can remove its temporary file. So every run records the process
that runs it (process_tags: host name, pid, when the process started, and on Linux which pid
namespace of which boot of which machine the pid belongs to), and every temporary file names
its writer's pid (files.atomic_path). The next stage start, and `python -m pipeline.runs
close-dead`, mark KILLED the RUNNING runs whose process is gone (close_dead_runs), folds with
their parent; each stage start removes the temporary files of writers that are gone
(remove_stale_temp_files). A process that lives to the end but whose store refuses the run's
status (a full disk) remembers the run on this machine, and the next start sets that status
(end_active_run, end_remembered_runs).

Only what this machine can see is judged: a run started on another host, or in another pid
namespace (a container) of this one, is left alone, since its process may well be running.
There is no heartbeat: on the same host the pid check is exact at once, while a heartbeat could
only guess after a timeout (a suspended laptop or a stopped job misses its beats and is alive),
and would cost every run a store write per interval.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.infra import paths
from pipeline.infra.credentials import redact
from pipeline.infra.errors import first_line
from pipeline.infra.files import (
    finish_replacement,
    read_json,
    staging_folders,
    temp_writer,
    write_json,
)

log = logging.getLogger(__name__)

HOST_TAG = "pipeline.host"
PID_TAG = "pipeline.pid"
START_TAG = "pipeline.pid_start"
SPACE_TAG = "pipeline.pid_space"
REASON_TAG = "pipeline.killed_because"  # set on the runs close_dead_runs marks KILLED

ALIVE = "alive"
ELSEWHERE = "elsewhere"  # another host or pid namespace: nothing here can tell
UNREADABLE = "?"  # a process runs under the pid but its start time cannot be read
_PROC = Path("/proc")


@dataclass(frozen=True)
class Process:
    """A process as a run records it. `start`: when it started, in clock ticks after boot
    (/proc/<pid>/stat field 22, proc(5)) on Linux, else psutil's create_time in seconds; with
    `pid` it tells this process from a later one that reuses the pid. `space`: where the pid
    means something, `<machine-id>/<boot-id>/<pid namespace>` on Linux, "" elsewhere."""

    host: str
    pid: int
    start: str
    space: str

    def tags(self) -> dict[str, str]:
        return {
            HOST_TAG: self.host,
            PID_TAG: str(self.pid),
            START_TAG: self.start,
            SPACE_TAG: self.space,
        }

    @classmethod
    def from_tags(cls, tags: dict[str, str]) -> Process | None:
        """The process recorded in a run's tags; None for a run without them (an older run)."""
        try:
            return cls(tags[HOST_TAG], int(tags[PID_TAG]), tags[START_TAG], tags.get(SPACE_TAG, ""))
        except (KeyError, ValueError):
            return None


def _read(path: str | Path) -> str:
    try:
        return Path(path).read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return ""


def _pid_space() -> str:
    try:
        namespace = os.readlink(_PROC / "self/ns/pid")
    except OSError:
        namespace = ""
    machine = _read("/etc/machine-id") or _read("/var/lib/dbus/machine-id")
    return f"{machine}/{_read(_PROC / 'sys/kernel/random/boot_id')}/{namespace}"


def _linux_stat(pid: int) -> tuple[str, int] | None:
    """(state, start in clock ticks after boot) of `pid` from /proc/<pid>/stat; None if no
    such process. The command name (field 2) may hold spaces and ')': split after its last ')'."""
    text = _read(_PROC / str(pid) / "stat")
    if not text:
        return None
    fields = text[text.rfind(")") + 2 :].split()
    return fields[0], int(fields[19])  # fields 3 (state) and 22 (starttime)


def process_start(pid: int) -> str | None:
    """When process `pid` started, in the form of the pipeline.pid_start tag; None when no such
    process runs (a zombie, killed but not yet reaped, counts as gone); UNREADABLE when one runs
    but its start cannot be read."""
    if _PROC.joinpath("self/stat").is_file():
        stat = _linux_stat(pid)
        return None if stat is None or stat[0] in "ZX" else str(stat[1])
    import psutil  # installed with DVC; only where there is no /proc (macOS, Windows)

    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return None
        return repr(process.create_time())
    except psutil.NoSuchProcess:
        return None
    except psutil.Error:
        return UNREADABLE


def process_started_at(pid: int) -> float | None:
    """When process `pid` started, in seconds since the epoch (at most a second early on
    Linux, whose boot time is whole seconds); None when no such process runs; -inf when one
    runs whose start cannot be read (so it counts as older than anything)."""
    start = process_start(pid)
    if start is None:
        return None
    if start == UNREADABLE:
        return float("-inf")
    if not _PROC.joinpath("self/stat").is_file():
        return float(start)
    stat = _read(_PROC / "stat").splitlines()
    booted = next(int(line.split()[1]) for line in stat if line.startswith("btime "))
    return booted + int(start) / os.sysconf("SC_CLK_TCK")


def this_process() -> Process:
    pid = os.getpid()
    start = process_start(pid)
    space = _pid_space() if _PROC.joinpath("self/stat").is_file() else ""
    return Process(socket.gethostname(), pid, start or UNREADABLE, space)


def process_tags() -> dict[str, str]:
    """The tags that record who runs a run (see Process), for tracked_run and child_run."""
    return this_process().tags()


def _machine_and_boot(space: str) -> tuple[str, str]:
    parts = space.split("/", 2)
    return (parts[0], parts[1]) if len(parts) == 3 else ("", "")


def judge(recorded: Process, here: Process | None = None) -> str:
    """ALIVE, ELSEWHERE (another host or pid namespace: cannot tell), or why the recorded
    process is gone: 'exited', 'pid reused by a later process', 'host rebooted'."""
    here = here or this_process()
    if recorded.host != here.host or UNREADABLE in (recorded.start, here.start):
        return ELSEWHERE
    if recorded.space != here.space:
        machine, boot = _machine_and_boot(recorded.space)
        our_machine, our_boot = _machine_and_boot(here.space)
        rebooted = machine == our_machine and boot != our_boot
        return "host rebooted" if rebooted and all((machine, boot, our_boot)) else ELSEWHERE
    start = process_start(recorded.pid)
    if start is None:
        return "exited"
    if start == UNREADABLE or start == recorded.start:
        return ALIVE
    return "pid reused by a later process"


@dataclass
class DeadRun:
    """A RUNNING run whose process is gone, with its RUNNING child (fold) runs."""

    run: Any  # mlflow.entities.Run
    reason: str
    children: list[str] = field(default_factory=list)

    def describe(self) -> str:
        tags = self.run.data.tags
        stage = tags.get("stage") or tags.get("mlflow.runName", "run")
        folds = ""
        if self.children:
            runs = "run" if len(self.children) == 1 else "runs"
            folds = f" and its {len(self.children)} fold {runs} ({', '.join(self.children)})"
        return (
            f"run {self.run.info.run_id} ({stage}, pid {tags.get(PID_TAG)} on "
            f"{tags.get(HOST_TAG)}: {self.reason}){folds}"
        )


def _running(client: Any, experiment_ids: Sequence[str], extra: str = "") -> list[Any]:
    """Every RUNNING run of the experiments matching the MLflow filter `extra`, paged."""
    query = "attributes.status = 'RUNNING'" + (f" and {extra}" if extra else "")
    found, token = [], None
    while True:
        page = client.search_runs(list(experiment_ids), query, page_token=token)
        found.extend(page)
        token = page.token
        if not token:
            return found


def find_dead_runs(
    client: Any,
    experiment_ids: Sequence[str],
    gone_hosts: Iterable[str] = (),
    this_host_only: bool = True,
) -> tuple[list[DeadRun], list[Any]]:
    """(the RUNNING runs whose process is gone, each with its RUNNING children; the RUNNING
    runs left alone because nothing here can tell: another host, another pid namespace, or no
    process recorded). `gone_hosts`: hosts the user knows are gone (a killed container): their
    runs count as gone. this_host_only: search only this host's runs (one cheap query)."""
    here = this_process()
    gone_hosts = set(gone_hosts)
    # MLflow's filters have no escapes; a host name never holds a quote, and if it did, judge
    # would still tell this host's runs from the others.
    quotable = this_host_only and "'" not in here.host
    query = f"tags.`{HOST_TAG}` = '{here.host}'" if quotable else ""
    running = _running(client, experiment_ids, query)
    verdicts: dict[str, str] = {}
    for run in running:
        recorded = Process.from_tags(run.data.tags)
        if recorded is not None and recorded.host in gone_hosts:
            verdicts[run.info.run_id] = f"host {recorded.host} named as gone"
        else:
            verdicts[run.info.run_id] = judge(recorded, here) if recorded else ELSEWHERE
    dead = {
        run.info.run_id: DeadRun(run, verdicts[run.info.run_id])
        for run in running
        if verdicts[run.info.run_id] not in (ALIVE, ELSEWHERE)
    }
    # A fold belongs to its parent's set: found through the parent, so that folds without a
    # process of their own recorded go too.
    for parent in list(dead):
        if parent not in dead or dead[parent].run.data.tags.get("mlflow.parentRunId") in dead:
            continue  # a fold, taken (or to be taken) with its parent
        children = _running(client, experiment_ids, f"tags.mlflow.parentRunId = '{parent}'")
        dead[parent].children = [child.info.run_id for child in children]
        for child in dead[parent].children:
            dead.pop(child, None)
    closed = {child for found in dead.values() for child in found.children}
    left = [
        run
        for run in running
        if verdicts[run.info.run_id] == ELSEWHERE and run.info.run_id not in closed
    ]
    return list(dead.values()), left


def close(client: Any, dead: DeadRun) -> None:
    """Mark the dead run's children, then the run, KILLED, each tagged with the reason."""
    for run_id in [*dead.children, dead.run.info.run_id]:
        client.set_tag(run_id, REASON_TAG, f"its process is gone ({dead.reason})")
        client.set_terminated(run_id, "KILLED")


def close_dead_runs(client: Any, uri: str, experiment_id: str) -> None:
    """At a stage start: end the runs of store `uri` that a process of this machine could not
    end (end_remembered_runs), then mark KILLED the RUNNING runs of this host in the experiment
    whose process is gone, one log line per run. Never fails the stage: a store that cannot be
    searched or written is logged and left as it is."""
    try:
        end_remembered_runs(client, uri)
        dead, _ = find_dead_runs(client, [experiment_id])
        for found in dead:
            close(client, found)
            log.info("marked %s KILLED", found.describe())
    except Exception as err:  # mlflow raises many types for a store in trouble
        log.warning("could not close the runs of processes that are gone: %s", first_line(err))


def _unended_file() -> Path:
    """This machine's record of the runs whose status could not be written (per user)."""
    state = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(state) / "digit-pipeline" / "unended-runs.json"


def _update_unended(change: Any) -> list[dict[str, str]]:
    """Apply `change` (list of records -> list of records) to the record file under a file
    lock, so parallel jobs never lose each other's records; returns the records it read."""
    from filelock import FileLock

    path = _unended_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{path}.lock"):
        records = read_json(path) if path.is_file() else []
        updated = change(records)
        if updated != records:
            write_json(path, updated)
    return records


def end_active_run(status: str) -> None:
    """End the active MLflow run with `status` (FINISHED, FAILED, KILLED). If the store refuses
    (a full disk, a sqlite lock held too long), a sqlite store is tried once more (a server's
    requests are already retried by MLflow); if it still refuses, the run is remembered on this
    machine and the next stage start on the same store ends it with `status`. Never raises: the
    stage's own error, if any, stays the one shown. mlflow.end_run takes the run off its stack
    before it writes the status, so the retry writes it directly."""
    import mlflow

    run_id, uri = mlflow.active_run().info.run_id, mlflow.get_tracking_uri()
    try:
        mlflow.end_run(status)
        return
    except Exception as err:  # mlflow raises many types for a store in trouble
        error = err
    if uri.startswith("sqlite:"):
        try:
            mlflow.MlflowClient(uri).set_terminated(run_id, status)
            return
        except Exception as err:
            error = err
    # A store URI may carry a password: remember it masked, as everything else the project writes.
    record = {"tracking_uri": redact(uri), "run_id": run_id, "status": status}
    try:
        _update_unended(lambda records: [*records, record])
    except OSError as err:
        log.warning("could not mark MLflow run %s %s: %s", run_id, status, first_line(error))
        log.warning("nor remember it in %s: %s", _unended_file(), err)
        return
    log.warning(
        "could not mark MLflow run %s %s: %s; the next stage start on this store will (it is "
        "remembered in %s)",
        run_id,
        status,
        first_line(error),
        _unended_file(),
    )


def end_remembered_runs(client: Any, uri: str) -> None:
    """End the runs of `uri` that end_active_run remembered, with their intended status, and
    forget them; a run something else ended meanwhile is only forgotten."""
    if not _unended_file().is_file():
        return
    from mlflow.exceptions import MlflowException

    records = [r for r in _update_unended(lambda same: same) if r["tracking_uri"] == redact(uri)]
    for record in records:
        try:
            status = client.get_run(record["run_id"]).info.status
        except MlflowException as err:
            if err.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            status = "deleted"
        if status == "RUNNING":
            client.set_terminated(record["run_id"], record["status"])
            log.info(
                "marked run %s %s, as its own process could not", record["run_id"], record["status"]
            )
        _update_unended(lambda current, done=record: [r for r in current if r != done])


# Where atomic_path's temporary files can be left: every stage's outputs (beside each output).
OUTPUT_DIRS = (
    paths.RAW_DIR,
    paths.PREPARED_DIR,
    paths.MODELS_DIR,
    paths.METRICS_DIR,
    paths.PLOTS_DIR,
    paths.RUNS_DIR,
    paths.REPORTS_DIR,
    paths.COMPARE_DIR,
)
# Clock slack for "started after the file was last written" (the boot time is whole seconds).
_SLACK_SECONDS = 2.0


# Where replaced_together stages a set of outputs: the root (train, crossval, report), data/
# (preprocess's data/prepared) and data/raw (fetch's data/raw/digits).
STAGING_ROOTS = (Path("."), paths.PREPARED_DIR.parent, paths.RAW_DIR)


def writer_gone(path: Path) -> bool:
    """True if the process named in atomic_path's (or replaced_together's) temporary `path` no
    longer runs, or runs a process that started after `path` was last written (pid reused);
    False for a live writer and for names atomic_path did not make."""
    if (pid := temp_writer(path.name)) is None:
        return False
    started = process_started_at(pid)
    return started is None or started > path.stat().st_mtime + _SLACK_SECONDS


def remove_stale_temp_files(root: Path) -> list[Path]:
    """Repair what writers that died (kill -9) left under root: a set of outputs they were
    replacing is completed or dropped (files.finish_replacement: all new or all old, one log line
    saying which), and the temporary files under root/<each output folder> are removed; only
    those of writers that are gone (writer_gone). Returns the removed temporary files."""
    for staging in (s for folder in STAGING_ROOTS for s in staging_folders(root / folder)):
        try:
            if not writer_gone(staging):
                continue
            if finish_replacement(staging):
                log.info(
                    "completed the replacement of outputs that process %s began (now all "
                    "new), left in %s",
                    temp_writer(staging.name),
                    staging,
                )
            else:
                log.info(
                    "dropped the unfinished outputs that process %s left in %s (the "
                    "previous outputs are kept)",
                    temp_writer(staging.name),
                    staging,
                )
        except OSError as err:  # e.g. a read-only folder: the stage itself will say so
            log.warning("could not repair %s: %s", staging, err)
    removed = []
    for path in (path for folder in OUTPUT_DIRS for path in (root / folder).rglob(".*.tmp*")):
        try:
            if writer_gone(path):
                path.unlink()
                log.info(
                    "removed %s, left by process %d, which is gone", path, temp_writer(path.name)
                )
                removed.append(path)
        except FileNotFoundError:  # its writer renamed it into place meanwhile
            continue
        except OSError as err:  # e.g. a read-only folder: the stage itself will say so
            log.warning("could not remove %s: %s", path, err)
    return removed
