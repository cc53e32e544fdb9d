"""Write, check, validate or promote params.yaml, the composition of conf/ that DVC tracks.

conf/ is the single source of truth. params.yaml is generated from it, by DVC itself on every
`dvc exp run` (Hydra composition is enabled in .dvc/config) and by `python -m pipeline.params`
after editing conf/, before a plain `dvc repro` (which never recomposes: iterative/dvc#10750).
`--check` exits non-zero when the two disagree, naming the keys; the test suite runs it.
`--validate` is dvc.yaml's first stage: params.yaml against the schema, before any other stage
(and so before DVC removes any output). `--promote NAME` turns an applied experiment's
params.yaml back into conf/: a preset conf/experiment/NAME.yaml, selected in conf/config.yaml.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

from pipeline.infra.credentials import redact
from pipeline.infra.errors import ConfigError
from pipeline.infra.files import atomic_path
from pipeline.infra.stage import run_command

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
PARAMS_FILE = CONF_DIR.parent / "params.yaml"
# The validate stage's output: the same bytes for every valid params.yaml, so the stages after it
# (which depend on it only to run after it) never re-run because params.yaml was validated again.
VALID_STAMP = "params.yaml passed the schema of pipeline/infra/config.py\n"
# conf/config.yaml's defaults entry for the experiment preset group (conf/experiment/).
EXPERIMENT_ENTRY = re.compile(r"^(  - experiment: )(\S+)$", flags=re.M)
SHOWN_KEYS = 10  # keys a --check failure lists before "and N more"


def compose_params(overrides: list[str] | None = None) -> str:
    """params.yaml's text for conf/ plus overrides, composed by DVC's own code path."""
    from dvc.utils.hydra import compose_and_dump

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "params.yaml"
        # Same arguments as `dvc exp run`: config dir conf/, plugins looked up from the repo root.
        compose_and_dump(out, str(CONF_DIR), None, "config", str(CONF_DIR.parent), overrides or [])
        return out.read_text(encoding="utf-8")


def stamp_file() -> Path:
    return PARAMS_FILE.with_name("params.ok")


# A key's path in a nested mapping (not a dotted string: dataset.files' file names hold dots).
KeyPath = tuple[str, ...]


def leaves(data: Any, path: KeyPath = ()) -> dict[KeyPath, Any]:
    """{key path: value} of a nested mapping; a list, or an empty mapping, is one leaf."""
    if not isinstance(data, dict) or not data:
        return {path: data}
    found: dict[KeyPath, Any] = {}
    for key, value in data.items():
        found |= leaves(value, (*path, str(key)))
    return found


def differing_keys(ours: dict, theirs: dict) -> list[KeyPath]:
    """The key paths whose value differs between two configs, or that only one sets."""
    a, b = leaves(ours), leaves(theirs)
    missing = object()
    return sorted(k for k in a.keys() | b.keys() if a.get(k, missing) != b.get(k, missing))


def dotted(path: KeyPath) -> str:
    return ".".join(path)


def _load(text: str, where: str) -> dict:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{where} is not valid YAML ({str(err).splitlines()[0]})") from None
    return data if isinstance(data, dict) else {}


def _describe(keys: list[KeyPath], ours: dict, theirs: dict) -> list[str]:
    """The differing keys to two levels (`dataset.files`, not each file), with both values where
    the key is one scalar: `epochs=2 (conf/: 5)`."""
    sections: dict[KeyPath, list[KeyPath]] = {}
    for key in keys:
        sections.setdefault(key[:2], []).append(key)
    described = []
    for section, inside in sections.items():
        values = [ours.get(section, "unset"), theirs.get(section, "unset")]
        if inside == [section] and not any(isinstance(v, dict | list) for v in values):
            described.append(f"{dotted(section)}={values[0]!r} (conf/: {values[1]!r})")
        else:
            described.append(dotted(section))
    return described


def check() -> None:
    """Raise ConfigError unless params.yaml is conf/ composed, naming the keys that differ."""
    expected = compose_params()
    current = PARAMS_FILE.read_text(encoding="utf-8") if PARAMS_FILE.exists() else ""
    if current == expected:
        return
    ours, theirs = _load(current, "params.yaml"), _load(expected, "conf/ composed")
    keys = differing_keys(ours, theirs)
    if not PARAMS_FILE.exists():
        what = "params.yaml is missing"
    elif keys:
        shown = _describe(keys, leaves(ours), leaves(theirs))
        more = f" and {len(shown) - SHOWN_KEYS} more" if len(shown) > SHOWN_KEYS else ""
        shown = shown[:SHOWN_KEYS]
        what = f"params.yaml does not match conf/ at {', '.join(shown)}{more}"
    else:
        what = "params.yaml holds conf/'s values but not as conf/ composes them (a hand edit?)"
    raise ConfigError(
        f"{what}. Run `python -m pipeline.params` to regenerate it from conf/ (or use `dvc exp "
        "run`, which recomposes it), or `python -m pipeline.params --promote NAME` to make conf/ "
        "say what params.yaml says (after `dvc exp apply`)"
    )


def refuse_passwords(text: str) -> None:
    """ConfigError if `text`, a params.yaml to be written or checked, holds a password or token
    in a URI (tracking.uri, dataset.mirrors): git tracks params.yaml, and DVC commits it with
    every experiment (`dvc exp push` publishes it)."""
    if redact(text) != text:
        [line] = [line for line in text.splitlines() if redact(line) != line][:1]
        raise ConfigError(
            f"params.yaml would hold a password ({redact(line.strip())}), and git tracks it: DVC "
            "commits it with every experiment. Fix: keep it out of the URI (a tracking server's "
            "login in MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD, docs/SECURITY.md) or "
            "pass the URI to the stage alone (python -m pipeline.train tracking.uri=...)"
        )


def _valid_params() -> dict:
    """params.yaml's content, checked against the schema as every stage reads it."""
    from omegaconf import OmegaConf

    from pipeline.infra.config import validate

    text = PARAMS_FILE.read_text(encoding="utf-8")
    refuse_passwords(text)
    params = _load(text, "params.yaml")
    try:
        validate(OmegaConf.create(params))
    except ConfigError as err:
        raise ConfigError(f"params.yaml: {err}") from None
    return params


def validate_params() -> None:
    """The validate stage: params.yaml against the schema. On success write the constant stamp;
    on failure raise ConfigError and write nothing."""
    try:
        _valid_params()
    except ConfigError as err:
        fix = "" if "Fix: " in str(err) else " Fix: use a key of conf/ (in params.yaml or -S)."
        raise ConfigError(
            f"{err}.{fix} No stage ran and no output was touched; `git checkout params.yaml` "
            "restores the committed one (`python -m pipeline.params`: conf/ composed)"
        ) from None
    stamp = stamp_file()
    if not stamp.is_file() or stamp.read_text(encoding="utf-8") != VALID_STAMP:
        with atomic_path(stamp) as tmp:
            tmp.write_text(VALID_STAMP, encoding="utf-8")
    print("params.yaml is valid")


def _composed(overrides: list[str]) -> dict:
    return _load(compose_params(overrides), "conf/ composed")


def _group_choices(target: dict, base: list[str]) -> list[str]:
    """The config group choices (`dataset=digits`, ...) under which conf/ composes closest to
    `target`: for each group that fills a section of its own, the option leaving the fewest keys
    different, the current choice kept on a tie. A choice swaps a whole section (a dataset's own
    files), which no value in a preset could remove."""
    choices: list[str] = []
    for group in sorted(target):
        options = sorted(path.stem for path in (CONF_DIR / group).glob("*.yaml"))
        if not options:  # a key, not a group (epochs, crossval)
            continue
        best, fewest = None, len(differing_keys(target, _composed(base + choices)))
        for option in options:
            found = len(differing_keys(target, _composed([*base, *choices, f"{group}={option}"])))
            if found < fewest:
                best, fewest = option, found
        if best is not None:
            choices.append(f"{group}={best}")
    return choices


def _nested(values: dict[KeyPath, Any]) -> dict:
    tree: dict = {}
    for path, value in values.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree


def promote(name: str) -> Path:
    """Make conf/ say what params.yaml says (an experiment applied by `dvc exp apply`): write the
    preset conf/experiment/<name>.yaml (its group choices and values, relative to conf/ without a
    preset), select it in conf/config.yaml, and check that conf/ now composes to params.yaml.
    Returns the preset's path. Raises ConfigError, with conf/ left as it was, for an invalid
    params.yaml, one that drops a key conf/ sets, or one conf/ cannot reproduce."""
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_-]*", name):
        raise ConfigError(f"--promote {name!r}: expected a name of letters, digits, _ and -")
    target = _valid_params()
    config = CONF_DIR / "config.yaml"
    config_text = config.read_text(encoding="utf-8")
    if not EXPERIMENT_ENTRY.search(config_text):
        raise ConfigError(f"{config} has no `  - experiment: ...` entry in its defaults list")
    base = ["~experiment"]  # a preset is the whole way from conf/ without one
    choices = _group_choices(target, base)
    composed = leaves(_composed(base + choices))
    wanted = leaves(target)
    if dropped := sorted(set(composed) - set(wanted)):
        raise ConfigError(
            f"params.yaml lacks {', '.join(map(dotted, dropped))}, which conf/ sets: a preset can "
            "add and change keys, not remove them. Fix: remove them from conf/ by hand"
        )
    values = _nested({k: v for k, v in wanted.items() if k not in composed or composed[k] != v})
    preset = CONF_DIR / "experiment" / f"{name}.yaml"
    previous = preset.read_text(encoding="utf-8") if preset.is_file() else None
    header = (
        "# @package _global_\n"
        f"# Promoted by `python -m pipeline.params --promote {name}`: conf/ with this preset\n"
        "# composes to the params.yaml it was promoted from (an experiment's, after\n"
        "# `dvc exp apply`). Selected in conf/config.yaml's defaults (null there drops it).\n"
    )
    body = {"defaults": [{f"override /{c.split('=')[0]}": c.split("=")[1]} for c in choices]}
    text = header + (yaml.safe_dump(body, sort_keys=False) if choices else "")
    text += yaml.safe_dump(values, sort_keys=False) if values else ""
    with atomic_path(preset) as tmp:
        tmp.write_text(text, encoding="utf-8")
    with atomic_path(config) as tmp:
        tmp.write_text(EXPERIMENT_ENTRY.sub(rf"\g<1>{name}", config_text), encoding="utf-8")
    try:
        params_text = compose_params()
        if left := differing_keys(target, _load(params_text, "conf/ composed")):
            raise ConfigError(
                "conf/ with the preset still differs from params.yaml at "
                f"{', '.join(map(dotted, left[:SHOWN_KEYS]))}: a later entry of conf/config.yaml's "
                "defaults (a debug preset?) sets them. conf/ was left as it was"
            )
    except BaseException:
        with atomic_path(config) as tmp:
            tmp.write_text(config_text, encoding="utf-8")
        if previous is None:
            preset.unlink()
        else:
            with atomic_path(preset) as tmp:
                tmp.write_text(previous, encoding="utf-8")
        raise
    if params_text != PARAMS_FILE.read_text(encoding="utf-8"):  # same values, conf/'s layout
        with atomic_path(PARAMS_FILE) as tmp:
            tmp.write_text(params_text, encoding="utf-8")
    return preset


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.params", description=__doc__)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="fail if params.yaml is stale")
    mode.add_argument(
        "--validate",
        action="store_true",
        help="check params.yaml against the schema (dvc.yaml's first stage) and write params.ok",
    )
    mode.add_argument(
        "--promote",
        metavar="NAME",
        help="write params.yaml's choices and values to conf/experiment/NAME.yaml and select it",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        help="Hydra overrides, e.g. dataset=digits epochs=2 (only when writing params.yaml)",
    )
    args = parser.parse_args(argv)
    if args.overrides and (args.check or args.validate or args.promote):
        parser.error("--check, --validate and --promote take params.yaml as is: give no overrides")
    if args.check:
        return run_command(lambda: (check(), print("params.yaml matches conf/")))
    if args.validate:
        return run_command(validate_params)
    if args.promote:
        return run_command(lambda: print(_promoted(promote(args.promote))))
    expected = compose_params(args.overrides)
    if (refused := run_command(lambda: refuse_passwords(expected))) != 0:
        return refused
    current = PARAMS_FILE.read_text(encoding="utf-8") if PARAMS_FILE.exists() else ""
    if current != expected:
        with atomic_path(PARAMS_FILE) as tmp:
            tmp.write_text(expected, encoding="utf-8")
        print(f"wrote {PARAMS_FILE}")
    return 0


def _promoted(preset: Path) -> str:
    return (
        f"wrote {preset} and selected it in {CONF_DIR / 'config.yaml'}: conf/ now composes to "
        "params.yaml. Commit conf/ and params.yaml (git add conf params.yaml)"
    )


def cli() -> int:
    """The installed command (digit-params): main inside the one-line envelope (run_command)."""
    return run_command(main)


if __name__ == "__main__":
    sys.exit(cli())
