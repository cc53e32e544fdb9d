"""params.yaml is conf/ composed: the two can never silently disagree.

`python -m pipeline.params --check` on the repository as it is, is THE guard: it fails as soon as
someone edits conf/ without regenerating params.yaml (or edits params.yaml by hand). The other
tests pin down that the composition is DVC's own (the one `dvc exp run` does), that it is the
same config Hydra's compose API gives the stages, and that the command regenerates and refuses
what it should, on a temporary copy of conf/ and params.yaml.

Two rules of docs/ARCHITECTURE.md live here too, each shown to fail when broken: the schema's
dataclass defaults are conf/'s defaults (no second set drifts apart), and dvc.yaml lists as a
stage's deps exactly the pipeline modules it runs. And every option of every conf/ group composes.
"""

from __future__ import annotations

import ast
import dataclasses
import re
import shutil
from pathlib import Path
from typing import Any, get_type_hints

import pytest
import yaml
from omegaconf import OmegaConf
from run_helpers import CONF_DIR, PROJECT_ROOT, compose

import pipeline.params
from pipeline.infra.config import Config, validate

PARAMS = PROJECT_ROOT / "params.yaml"
# Shared plumbing every stage imports (config schema, paths, errors, atomic writes, the entry
# wrapper): not listed as deps, or any edit to it would re-run the whole pipeline.
INFRASTRUCTURE = {
    "infra",
    "infra.config",
    "infra.errors",
    "infra.files",
    "infra.paths",
    "infra.stage",
}


def _validated(cfg: Any) -> dict:
    """The typed, range-checked settings a stage would run with, as a plain container."""
    return OmegaConf.to_container(OmegaConf.structured(validate(cfg)))  # type: ignore[return-value]


def _schema_leaves(schema: type = Config, prefix: str = "") -> list[str]:
    """Dotted keys of the schema's fields; a dict-valued field (dataset.files) is one leaf."""
    keys: list[str] = []
    for key, kind in get_type_hints(schema).items():
        if dataclasses.is_dataclass(kind):  # a nested config section
            keys += _schema_leaves(kind, f"{prefix}{key}.")
        else:
            keys.append(f"{prefix}{key}")
    return keys


def _get(data: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        data = data[part]
    return data


# --------------------------------------------------------------------------- the repository


def test_check_passes_on_the_repository(capsys: pytest.CaptureFixture[str]) -> None:
    """conf/ and the committed params.yaml agree. If this fails: `python -m pipeline.params`."""
    assert pipeline.params.CONF_DIR == CONF_DIR
    assert pipeline.params.PARAMS_FILE == PARAMS
    assert pipeline.params.main(["--check"]) == 0, capsys.readouterr().err
    assert "params.yaml matches conf/" in capsys.readouterr().out


def test_params_yaml_is_exactly_conf_composed_by_hydra() -> None:
    """Hydra's compose API on conf/ gives params.yaml's content, key for key and type for type."""
    composed = OmegaConf.to_container(compose(), resolve=True)
    assert composed == yaml.safe_load(PARAMS.read_text(encoding="utf-8"))


def test_validated_conf_equals_params_yaml_on_every_schema_key() -> None:
    """conf/ composed and validated is params.yaml: params.yaml holds only schema sections,
    every schema key it sets has the validated value, and validating either gives the same."""
    from_conf = _validated(compose())
    params = yaml.safe_load(PARAMS.read_text(encoding="utf-8"))
    schema = OmegaConf.to_container(OmegaConf.structured(Config))
    assert isinstance(schema, dict)

    assert set(params) == set(schema)
    assert from_conf == _validated(OmegaConf.create(params))
    checked = 0
    for key in _schema_leaves():
        try:
            value = _get(params, key)
        except KeyError:
            continue  # a schema default conf/ does not set (e.g. mnist's dataset.split_seed)
        assert OmegaConf.create({"v": _get(from_conf, key)}) == OmegaConf.create({"v": value}), key
        checked += 1
    assert checked >= 20  # nearly every key is set explicitly in conf/


# The chosen dataset's own data, not defaults: every conf/dataset/*.yaml sets them and the schema
# leaves them empty. A non-empty schema default would leak into other datasets: OmegaConf merges a
# dict field key by key, so mnist's files would be added to every dataset's `dataset.files`.
DATASET_OWN = {"dataset.mirrors", "dataset.files"}
# Set by conf/dataset/digits.yaml only (its own train/test split): with the default mnist,
# conf/ leaves them to the schema.
SCHEMA_ONLY = {"dataset.test_fraction", "dataset.split_seed"}


def _default_drift(defaults: dict, composed: dict) -> list[str]:
    """One line per schema key whose dataclass default (`defaults`, the schema as a container)
    differs from conf/ composed with its default choices (`composed`, a plain container).

    A key conf/ sets is compared after validation (conf's `30` for a float field is 30.0); a
    key conf/ does not set must be one of SCHEMA_ONLY, so a new schema field cannot hide a
    default that params.yaml (and so DVC) never sees.
    """
    validated = _validated(OmegaConf.create(composed))
    found = []
    for key in _schema_leaves():
        default = _get(defaults, key)
        if key in DATASET_OWN:
            if default:
                found.append(f"{key}: schema default {default!r}, expected empty (dataset data)")
            continue
        try:
            _get(composed, key)
        except KeyError:
            if key not in SCHEMA_ONLY:
                found.append(f"{key}: schema default {default!r}, not set in conf/")
            continue
        if _get(validated, key) != default:
            found.append(f"{key}: schema default {default!r}, conf/ {_get(validated, key)!r}")
    return found


def _schema_defaults() -> dict:
    return OmegaConf.to_container(OmegaConf.structured(Config))  # type: ignore[return-value]


def test_schema_defaults_equal_conf_defaults() -> None:
    """The dataclass defaults of pipeline/infra/config.py are conf/ composed with its default
    choices, key by key: two sets of defaults that cannot drift apart. conf/ is the source of
    truth; on a failure, fix the schema's default."""
    # without an experiment preset: one that `--promote` selected holds an experiment's values
    composed = OmegaConf.to_container(compose("~experiment"), resolve=True)
    found = _default_drift(_schema_defaults(), composed)  # type: ignore[arg-type]
    assert not found, "\n".join(found)


def test_every_dataset_sets_its_own_data() -> None:
    for option in sorted((CONF_DIR / "dataset").glob("*.yaml")):
        dataset = yaml.safe_load(option.read_text(encoding="utf-8"))
        assert dataset["name"] == option.stem
        assert {f"dataset.{k}" for k in dataset} >= DATASET_OWN, option.name


@pytest.mark.parametrize(
    ("where", "key", "value", "expected"),
    [
        ("schema", "epochs", 6, "epochs: schema default 6, conf/ 5"),
        ("schema", "model.optimizer", "adam", "model.optimizer: schema default 'adam'"),
        ("schema", "dataset.files", {"a.gz": "0" * 64}, "dataset.files: schema default"),
        ("conf", "crossval.shuffle", False, "crossval.shuffle: schema default True, conf/ False"),
        ("conf", "folds", None, "folds: schema default 5, not set in conf/"),
    ],
)
def test_a_drifted_default_is_found(where: str, key: str, value: Any, expected: str) -> None:
    """A changed default on either side (None: conf/ no longer sets the key) is reported: one
    new finding besides those the repository may have (test_schema_defaults_equal_conf_defaults
    requires none)."""
    defaults = _schema_defaults()
    composed = OmegaConf.to_container(compose("~experiment"), resolve=True)
    assert isinstance(composed, dict)
    before = _default_drift(defaults, composed)
    section = defaults if where == "schema" else composed
    *parents, leaf = key.split(".")
    for part in parents:
        section = section[part]
    if value is None:
        del section[leaf]
    else:
        section[leaf] = value
    found = [line for line in _default_drift(defaults, composed) if line not in before]
    assert len(found) == 1 and expected in found[0], found


def _config_choices() -> list[tuple[str, str]]:
    """(group, option) for every config file in a group folder of conf/, e.g. (model, cnn),
    (hydra/launcher, ray_cluster)."""
    return sorted(
        (path.parent.relative_to(CONF_DIR).as_posix(), path.stem)
        for path in CONF_DIR.glob("*/**/*.yaml")
    )


def test_the_config_groups_are_all_seen() -> None:
    groups = {group for group, _ in _config_choices()}
    expected = {"dataset", "model", "tracking", "hparams_search", "debug", "hydra/launcher"}
    assert groups >= expected | {"experiment"}
    assert ("debug", "fast") in _config_choices()
    assert ("experiment", "digits_small") in _config_choices()


@pytest.mark.parametrize(("group", "option"), _config_choices())
def test_every_config_choice_composes_and_validates(group: str, option: str) -> None:
    """Each option of each group composes with the rest of conf/ (the Ray launcher and the Optuna
    sweeper through their installed plugins) and its settings pass the schema."""
    from omegaconf import open_dict

    cfg = compose(f"{group}={option}", return_hydra_config=True)
    assert cfg.hydra.runtime.choices[group] == option
    with open_dict(cfg):
        del cfg["hydra"]
    validate(cfg)


def test_the_debug_preset_is_a_small_offline_run() -> None:
    fast = validate(compose("debug=fast"))
    assert fast.dataset.name == "digits"
    assert (fast.epochs, fast.folds, fast.threads) == (1, 2, 1)
    assert fast.width < validate(compose()).width
    # keys given on the command line still win over the preset
    assert validate(compose("debug=fast", "epochs=3")).epochs == 3


def test_stages_read_params_yaml_through_hydra_as_conf() -> None:
    """A stage runs `--config-dir . --config-name params`: composing params.yaml that way gives
    the same settings as conf/ itself."""
    through_params = _validated(compose(config_dir=PROJECT_ROOT, config_name="params"))
    assert through_params == _validated(compose())


# The params stage checks params.yaml against the schema: the schema's code (infra/config.py and
# what it imports) is what it runs, so it lists what the other stages leave out as plumbing.
SCHEMA_STAGE = "params"


def _pipeline_imports(module: Path) -> set[str]:
    """The pipeline modules `module` imports, at the top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(module.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module == "pipeline":
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pipeline."):
            found.add(node.module.removeprefix("pipeline."))
    return found


def _module_path(module: str) -> Path:
    return PROJECT_ROOT / "pipeline" / f"{module.replace('.', '/')}.py"


def _code_deps(module: str) -> set[str]:
    """The pipeline modules `module` runs, directly or through the modules it imports."""
    plumbing = INFRASTRUCTURE - {"infra.config"} if module == SCHEMA_STAGE else INFRASTRUCTURE
    seen, todo = set(), [module]
    while todo:
        current = todo.pop()
        if current in seen or current in plumbing:
            continue
        seen.add(current)
        todo.extend(m for m in _pipeline_imports(_module_path(current)) if _module_path(m).exists())
    return {_module_path(m).relative_to(PROJECT_ROOT).as_posix() for m in seen}


def _deps_mismatches(stages: dict) -> list[str]:
    """One line per stage of dvc.yaml's `stages` whose pipeline/ deps are not the code it runs."""
    found = []
    for name, stage in stages.items():
        listed = {d for d in stage["deps"] if d.startswith("pipeline/")}
        needed = _code_deps(name)
        if missing := sorted(needed - listed):
            found.append(f"{name}: runs {missing} but does not list it in deps")
        if extra := sorted(listed - needed):
            found.append(f"{name}: lists {extra} in deps but does not run it")
    return found


def _stages() -> dict:
    return yaml.safe_load((PROJECT_ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"]


def test_every_stage_depends_on_the_code_it_runs() -> None:
    """dvc.yaml's code deps are honest: editing a module a stage imports re-runs that stage."""
    found = _deps_mismatches(_stages())
    assert not found, "\n".join(found)


def test_a_missing_or_extra_code_dep_is_found() -> None:
    """The deps check fails on a dvc.yaml that drops a module train runs or that lists one it
    does not run (the sample grid)."""
    stages = {name: {"deps": ["data/prepared", *sorted(_code_deps(name))]} for name in _stages()}
    assert _deps_mismatches(stages) == []
    train = stages["train"]["deps"]
    assert "pipeline/core/data.py" in _code_deps("train")
    assert "pipeline/core/grids.py" not in _code_deps("train")

    stages["train"]["deps"] = [d for d in train if d != "pipeline/core/data.py"]
    assert _deps_mismatches(stages) == [
        "train: runs ['pipeline/core/data.py'] but does not list it in deps"
    ]
    stages["train"]["deps"] = [*train, "pipeline/core/grids.py"]
    assert _deps_mismatches(stages) == [
        "train: lists ['pipeline/core/grids.py'] in deps but does not run it"
    ]


def test_dvc_exp_run_composes_the_same_params_yaml(tmp_path: Path) -> None:
    """.dvc/config turns DVC's Hydra composition on for conf/config.yaml, and DVC's composition,
    called with the arguments `dvc exp run` derives from .dvc/config, writes params.yaml as is."""
    from dvc.config import Config as DvcConfig
    from dvc.utils.hydra import compose_and_dump

    hydra = DvcConfig(dvc_dir=str(PROJECT_ROOT / ".dvc"))["hydra"]
    assert hydra["enabled"] is True
    assert hydra.get("config_module") is None
    config_dir = PROJECT_ROOT / hydra.get("config_dir", "conf")
    config_name = hydra.get("config_name", "config")
    assert (config_dir, config_name) == (CONF_DIR, "config")

    out = tmp_path / "params.yaml"
    compose_and_dump(out, str(config_dir), None, config_name, str(PROJECT_ROOT), [])
    assert out.read_text(encoding="utf-8") == PARAMS.read_text(encoding="utf-8")
    assert pipeline.params.compose_params() == out.read_text(encoding="utf-8")

    # a group choice such as the test-size preset composes there as it does for the stages
    compose_and_dump(out, str(config_dir), None, config_name, str(PROJECT_ROOT), ["debug=fast"])
    fast = yaml.safe_load(out.read_text(encoding="utf-8"))
    assert _validated(OmegaConf.create(fast)) == _validated(compose("debug=fast"))


# --------------------------------------------------------------------------- a temporary copy


@pytest.fixture
def conf_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of conf/ and params.yaml that pipeline.params reads and writes instead, without
    the experiment preset a `--promote` may have selected in the repository's conf/."""
    root = tmp_path / "project"
    shutil.copytree(CONF_DIR, root / "conf")
    shutil.copy2(PARAMS, root / "params.yaml")
    monkeypatch.setattr(pipeline.params, "CONF_DIR", root / "conf")
    monkeypatch.setattr(pipeline.params, "PARAMS_FILE", root / "params.yaml")
    config = root / "conf" / "config.yaml"
    text = config.read_text(encoding="utf-8")
    if not re.search(r"^  - experiment: null$", text, flags=re.M):
        config.write_text(pipeline.params.EXPERIMENT_ENTRY.sub(r"\g<1>null", text), "utf-8")
        assert pipeline.params.main([]) == 0
    return root


def _set_epochs(config_yaml: Path, epochs: int) -> None:
    text, count = re.subn(
        r"^epochs: \d+$",
        f"epochs: {epochs}",
        config_yaml.read_text(encoding="utf-8"),
        flags=re.M,
    )
    assert count == 1, "conf/config.yaml should set epochs once at top level"
    config_yaml.write_text(text, encoding="utf-8")


def _params(root: Path) -> dict:
    return yaml.safe_load((root / "params.yaml").read_text(encoding="utf-8"))


def test_copy_starts_in_sync(conf_copy: Path) -> None:
    assert pipeline.params.main(["--check"]) == 0


def test_editing_conf_makes_check_fail_and_main_regenerates(
    conf_copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    old_epochs = _params(conf_copy)["epochs"]
    _set_epochs(conf_copy / "conf" / "config.yaml", old_epochs + 7)
    capsys.readouterr()

    assert pipeline.params.main(["--check"]) == 1
    err = capsys.readouterr().err
    assert "params.yaml does not match conf/" in err
    assert "python -m pipeline.params" in err
    assert _params(conf_copy)["epochs"] == old_epochs  # --check never writes

    assert pipeline.params.main([]) == 0
    assert f"wrote {conf_copy / 'params.yaml'}" in capsys.readouterr().out
    assert _params(conf_copy)["epochs"] == old_epochs + 7
    assert pipeline.params.main(["--check"]) == 0


def test_main_leaves_an_up_to_date_params_yaml_alone(
    conf_copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    params = conf_copy / "params.yaml"
    before = params.stat().st_mtime_ns
    assert pipeline.params.main([]) == 0
    assert "wrote" not in capsys.readouterr().out
    assert params.stat().st_mtime_ns == before


def test_editing_params_yaml_by_hand_makes_check_fail(conf_copy: Path) -> None:
    params = conf_copy / "params.yaml"
    params.write_text(params.read_text(encoding="utf-8") + "# hand edit\n", encoding="utf-8")
    assert pipeline.params.main(["--check"]) == 1


def test_missing_params_yaml_fails_check_and_is_created(conf_copy: Path) -> None:
    (conf_copy / "params.yaml").unlink()
    assert pipeline.params.main(["--check"]) == 1
    assert pipeline.params.main([]) == 0
    assert pipeline.params.main(["--check"]) == 0


def test_overrides_are_written(conf_copy: Path) -> None:
    default = _params(conf_copy)
    assert pipeline.params.main(["dataset=digits", "epochs=2"]) == 0
    params = _params(conf_copy)
    assert params["epochs"] == 2
    # the whole digits group replaces the default dataset, not just its name
    expected_dataset = yaml.safe_load((CONF_DIR / "dataset" / "digits.yaml").read_text("utf-8"))
    assert params["dataset"] == expected_dataset
    assert params["dataset"]["name"] == "digits"
    # everything else is untouched conf/
    assert {k: v for k, v in params.items() if k not in ("dataset", "epochs")} == {
        k: v for k, v in default.items() if k not in ("dataset", "epochs")
    }
    # the result validates, and conf/ itself no longer matches it
    assert validate(OmegaConf.create(params)).dataset.name == "digits"
    assert pipeline.params.main(["--check"]) == 1


def test_check_with_overrides_is_a_usage_error(
    conf_copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = (conf_copy / "params.yaml").read_bytes()
    with pytest.raises(SystemExit) as exc:
        pipeline.params.main(["--check", "epochs=2"])
    assert exc.value.code == 2
    assert "give no overrides" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        pipeline.params.main(["--promote", "x", "epochs=2"])
    assert (conf_copy / "params.yaml").read_bytes() == before


def test_bad_override_is_rejected_without_writing(conf_copy: Path) -> None:
    from hydra.errors import HydraException

    before = (conf_copy / "params.yaml").read_bytes()
    with pytest.raises(HydraException):
        pipeline.params.main(["dataset=no_such_dataset"])
    assert (conf_copy / "params.yaml").read_bytes() == before


def test_check_names_the_keys_that_differ(
    conf_copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """After `dvc exp apply`, --check says which keys params.yaml and conf/ disagree on, with
    both values for a single key and a dataset's own files as one key."""
    assert pipeline.params.main(["dataset=digits", "epochs=2"]) == 0
    capsys.readouterr()
    assert pipeline.params.main(["--check"]) == 1
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("error: params.yaml does not match conf/ at "), line
    assert "epochs=2 (conf/: 5)" in line and "dataset.name='digits' (conf/: 'mnist')" in line
    assert "dataset.files" in line and "dataset.files." not in line
    assert "--promote NAME" in line


@pytest.mark.parametrize(
    ("overrides", "preset"),
    [
        (
            ["dataset=digits", "epochs=2"],
            {"defaults": [{"override /dataset": "digits"}], "epochs": 2},
        ),
        (
            ["model.depth=2", "crossval.stratified=true"],
            {"model": {"depth": 2}, "crossval": {"stratified": True}},
        ),
        (
            ["experiment=digits_small", "epochs=40"],
            {
                "defaults": [{"override /dataset": "digits"}],
                "epochs": 40,
                "width": 64,
                "batch_size": 32,
            },
        ),
    ],
    ids=["dataset-and-epochs", "nested-values", "a-preset-changed"],
)
def test_promote_makes_conf_compose_to_params_yaml(
    overrides: list[str], preset: dict, conf_copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The promotion loop: params.yaml as an experiment left it (composed with overrides),
    `--promote trial` writes conf/experiment/trial.yaml (group choices and values, from conf/
    without a preset) and selects it; --check is then green, and the stages' own Hydra
    composition of conf/ gives params.yaml's values."""
    assert pipeline.params.main(overrides) == 0
    params = _params(conf_copy)
    assert pipeline.params.main(["--promote", "trial"]) == 0
    assert "conf/experiment/trial.yaml" in capsys.readouterr().out
    written = yaml.safe_load((conf_copy / "conf/experiment/trial.yaml").read_text("utf-8"))
    assert written == preset
    config = (conf_copy / "conf/config.yaml").read_text(encoding="utf-8")
    assert re.search(r"^  - experiment: trial$", config, flags=re.M)
    assert pipeline.params.main(["--check"]) == 0
    assert _params(conf_copy) == params
    composed = compose(config_dir=conf_copy / "conf")
    assert OmegaConf.to_container(composed, resolve=True) == params


def test_promote_refuses_an_invalid_params_yaml_and_leaves_conf_alone(
    conf_copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = {p: p.read_bytes() for p in (conf_copy / "conf").rglob("*.yaml")}
    params = conf_copy / "params.yaml"
    params.write_text(params.read_text(encoding="utf-8") + "epoch: 3\n", encoding="utf-8")
    assert pipeline.params.main(["--promote", "trial"]) == 1
    [line] = capsys.readouterr().err.splitlines()
    assert "'epoch'" in line and "(did you mean 'epochs'?)" in line, line
    assert {p: p.read_bytes() for p in (conf_copy / "conf").rglob("*.yaml")} == before


def test_validate_writes_the_same_stamp_for_every_valid_params_yaml(conf_copy: Path) -> None:
    """The params stage's output has the same bytes for any valid params.yaml (so the stages
    after it do not re-run), and an invalid one writes nothing."""
    stamp = conf_copy / "params.ok"
    assert pipeline.params.main(["--validate"]) == 0
    first = stamp.read_bytes()
    assert pipeline.params.main(["dataset=digits", "epochs=2"]) == 0
    assert pipeline.params.main(["--validate"]) == 0
    assert stamp.read_bytes() == first
    stamp.unlink()
    params = conf_copy / "params.yaml"
    params.write_text(params.read_text(encoding="utf-8").replace("epochs: 2", "epochs: -1"))
    assert pipeline.params.main(["--validate"]) == 1
    assert not stamp.exists()


def test_train_and_crossval_replace_every_output_dvc_tracks() -> None:
    """The set each stage replaces at once (files.replaced_together) is dvc.yaml's outs and
    metrics: an output left out would be replaced on its own, or not at all."""
    from pipeline.infra import paths

    stages = _stages()
    for name, outputs in (("train", paths.TRAIN_OUTPUTS), ("crossval", paths.CROSSVAL_OUTPUTS)):
        tracked = [*stages[name]["outs"], *stages[name]["metrics"]]
        assert sorted(o.as_posix() for o in outputs) == sorted(tracked), name


@pytest.mark.parametrize("dataset", sorted(p.stem for p in (CONF_DIR / "dataset").glob("*.yaml")))
def test_every_param_a_stage_lists_is_in_params_yaml_for_every_dataset(dataset: str) -> None:
    """DVC refuses a stage whose params are missing from params.yaml ("Parameters ... are
    missing"): on a fresh clone's default dataset, `dvc repro` would stop at fetch."""
    params = compose(f"dataset={dataset}")
    listed = [
        (name, key)
        for name, stage in _stages().items()
        for key in stage.get("params", [])
        if isinstance(key, str)  # `- params.yaml:` (the whole file) is a mapping
    ]
    missing = [f"{name}: {key}" for name, key in listed if OmegaConf.select(params, key) is None]
    assert listed and not missing, f"dataset={dataset}: params.yaml lacks {missing}"


@pytest.mark.parametrize(
    "override",
    ["tracking.uri=http://alice:S3CRET@127.0.0.1:5000", "dataset.mirrors=[https://u:S3CRET@h/]"],
)
def test_a_password_never_reaches_params_yaml(
    conf_copy: Path, override: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """git tracks params.yaml and DVC commits it with each experiment: writing one with a
    password is refused, and so is checking one (`dvc exp run -S ...` writes it itself)."""
    before = (conf_copy / "params.yaml").read_bytes()
    assert pipeline.params.main([override]) == 1
    [line] = capsys.readouterr().err.splitlines()
    assert "would hold a password" in line and "S3CRET" not in line and "***" in line, line
    assert (conf_copy / "params.yaml").read_bytes() == before

    key, value = override.split("=", 1)
    params = yaml.safe_load(before)
    node = params
    *parents, leaf = key.split(".")
    for part in parents:
        node = node[part]
    node[leaf] = yaml.safe_load(value)
    (conf_copy / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    assert pipeline.params.main(["--validate"]) == 1
    [line] = capsys.readouterr().err.splitlines()
    assert "would hold a password" in line and "S3CRET" not in line, line
