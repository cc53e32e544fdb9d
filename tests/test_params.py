"""params.yaml is conf/ composed: the two can never silently disagree.

`python -m pipeline.params --check` on the repository as it is, is THE guard: it fails as soon as
someone edits conf/ without regenerating params.yaml (or edits params.yaml by hand). The other
tests pin down that the composition is DVC's own (the one `dvc exp run` does), that it is the
same config Hydra's compose API gives the stages, and that the command regenerates and refuses
what it should, on a temporary copy of conf/ and params.yaml.
"""

from __future__ import annotations

import ast
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from omegaconf import OmegaConf

import pipeline.params
from pipeline.infra.config import Config, validate

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"
PARAMS = ROOT / "params.yaml"
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


def _compose(config_dir: Path, config_name: str, *overrides: str) -> Any:
    """Compose with Hydra's compose API, the way a stage's @hydra.main does (version_base 1.3)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        return compose(config_name=config_name, overrides=list(overrides))


def _validated(cfg: Any) -> dict:
    """The typed, range-checked settings a stage would run with, as a plain container."""
    return OmegaConf.to_container(OmegaConf.structured(validate(cfg)))  # type: ignore[return-value]


def _schema_leaves(schema: dict, prefix: str = "") -> list[str]:
    """Dotted keys of the schema's fields; a dict-valued field (dataset.files) is one leaf."""
    keys: list[str] = []
    for key, value in schema.items():
        if isinstance(value, dict) and value:  # a nested config section
            keys += _schema_leaves(value, f"{prefix}{key}.")
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
    assert pipeline.params.CONF_DIR == CONF
    assert pipeline.params.PARAMS_FILE == PARAMS
    assert pipeline.params.main(["--check"]) == 0, capsys.readouterr().err
    assert "params.yaml matches conf/" in capsys.readouterr().out


def test_params_yaml_is_exactly_conf_composed_by_hydra() -> None:
    """Hydra's compose API on conf/ gives params.yaml's content, key for key and type for type."""
    composed = OmegaConf.to_container(_compose(CONF, "config"), resolve=True)
    assert composed == yaml.safe_load(PARAMS.read_text(encoding="utf-8"))


def test_validated_conf_equals_params_yaml_on_every_schema_key() -> None:
    """conf/ composed and validated is params.yaml: params.yaml holds only schema sections,
    every schema key it sets has the validated value, and validating either gives the same."""
    from_conf = _validated(_compose(CONF, "config"))
    params = yaml.safe_load(PARAMS.read_text(encoding="utf-8"))
    schema = OmegaConf.to_container(OmegaConf.structured(Config))
    assert isinstance(schema, dict)

    assert set(params) == set(schema)
    assert from_conf == _validated(OmegaConf.create(params))
    checked = 0
    for key in _schema_leaves(schema):
        try:
            value = _get(params, key)
        except KeyError:
            continue  # a schema default conf/ does not set (e.g. mnist's dataset.split_seed)
        assert OmegaConf.create({"v": _get(from_conf, key)}) == OmegaConf.create({"v": value}), key
        checked += 1
    assert checked >= 20  # nearly every key is set explicitly in conf/


def test_stages_read_params_yaml_through_hydra_as_conf() -> None:
    """A stage runs `--config-dir . --config-name params`: composing params.yaml that way gives
    the same settings as conf/ itself."""
    through_params = _validated(_compose(ROOT, "params"))
    assert through_params == _validated(_compose(CONF, "config"))


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
    return ROOT / "pipeline" / f"{module.replace('.', '/')}.py"


def _code_deps(module: str) -> set[str]:
    """The pipeline modules `module` runs, directly or through the modules it imports."""
    seen, todo = set(), [module]
    while todo:
        current = todo.pop()
        if current in seen or current in INFRASTRUCTURE:
            continue
        seen.add(current)
        todo.extend(m for m in _pipeline_imports(_module_path(current)) if _module_path(m).exists())
    return {_module_path(m).relative_to(ROOT).as_posix() for m in seen}


def test_every_stage_depends_on_the_code_it_runs() -> None:
    """dvc.yaml's code deps are honest: editing a module a stage imports re-runs that stage."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    for name, stage in stages.items():
        listed = {d for d in stage["deps"] if d.startswith("pipeline/")}
        assert listed == _code_deps(name), name


def test_dvc_exp_run_composes_the_same_params_yaml(tmp_path: Path) -> None:
    """.dvc/config turns DVC's Hydra composition on for conf/config.yaml, and DVC's composition,
    called with the arguments `dvc exp run` derives from .dvc/config, writes params.yaml as is."""
    from dvc.config import Config as DvcConfig
    from dvc.utils.hydra import compose_and_dump

    hydra = DvcConfig(dvc_dir=str(ROOT / ".dvc"))["hydra"]
    assert hydra["enabled"] is True
    assert hydra.get("config_module") is None
    config_dir = ROOT / hydra.get("config_dir", "conf")
    config_name = hydra.get("config_name", "config")
    assert (config_dir, config_name) == (CONF, "config")

    out = tmp_path / "params.yaml"
    compose_and_dump(out, str(config_dir), None, config_name, str(ROOT), [])
    assert out.read_text(encoding="utf-8") == PARAMS.read_text(encoding="utf-8")
    assert pipeline.params.compose_params() == out.read_text(encoding="utf-8")


# --------------------------------------------------------------------------- a temporary copy


@pytest.fixture
def conf_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of conf/ and params.yaml that pipeline.params reads and writes instead."""
    root = tmp_path / "project"
    shutil.copytree(CONF, root / "conf")
    shutil.copy2(PARAMS, root / "params.yaml")
    monkeypatch.setattr(pipeline.params, "CONF_DIR", root / "conf")
    monkeypatch.setattr(pipeline.params, "PARAMS_FILE", root / "params.yaml")
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
    assert pipeline.params.main(["dataset=digits", "epochs=2"]) == 0
    params = _params(conf_copy)
    assert params["epochs"] == 2
    # the whole digits group replaces the default dataset, not just its name
    expected_dataset = yaml.safe_load((CONF / "dataset" / "digits.yaml").read_text("utf-8"))
    assert params["dataset"] == expected_dataset
    assert params["dataset"]["name"] == "digits"
    # everything else is untouched conf/
    default = yaml.safe_load(PARAMS.read_text(encoding="utf-8"))
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
    assert (conf_copy / "params.yaml").read_bytes() == before


def test_bad_override_is_rejected_without_writing(conf_copy: Path) -> None:
    from hydra.errors import HydraException

    before = (conf_copy / "params.yaml").read_bytes()
    with pytest.raises(HydraException):
        pipeline.params.main(["dataset=no_such_dataset"])
    assert (conf_copy / "params.yaml").read_bytes() == before
