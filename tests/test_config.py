"""conf/ composes with Hydra for every group option and pipeline.infra.config.validate checks it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

import pytest
from run_helpers import CONF_DIR, compose, names_key

from pipeline.infra.config import Config, validate
from pipeline.infra.errors import ConfigError

# MNIST's and Fashion-MNIST's four IDX files (the same names).
IDX_FILES = {
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
}
GROUP_OPTIONS = {
    "dataset": {"mnist", "fashion_mnist", "digits"},
    "model": {"mlp", "cnn", "lenet5"},
    "tracking": {"local", "server"},
}


def test_conf_groups_hold_exactly_the_expected_options():
    found = {group: {p.stem for p in (CONF_DIR / group).glob("*.yaml")} for group in GROUP_OPTIONS}
    assert found == GROUP_OPTIONS


def test_default_config_validates():
    cfg = validate(compose("~experiment"))  # the classic defaults, under any promoted preset
    assert isinstance(cfg, Config)
    assert (cfg.epochs, cfg.batch_size, cfg.folds, cfg.width) == (5, 128, 5, 512)
    assert cfg.dataset.name == "mnist"
    assert cfg.model.name == "mlp"
    assert set(cfg.dataset.files) == IDX_FILES
    assert all(re.fullmatch(r"[0-9a-f]{64}", sha) for sha in cfg.dataset.files.values())
    assert cfg.dataset.mirrors


@pytest.mark.parametrize(
    ("group", "option"),
    [(group, option) for group, options in GROUP_OPTIONS.items() for option in sorted(options)],
)
def test_every_group_option_composes_and_validates(group, option):
    cfg = validate(compose(f"{group}={option}"))
    if group == "dataset":
        assert cfg.dataset.name == option
        if option == "digits":
            assert cfg.dataset.mirrors == [] and cfg.dataset.files == {}
        else:
            assert set(cfg.dataset.files) == IDX_FILES
            assert cfg.dataset.mirrors
    elif group == "model":
        assert cfg.model.name == option
        assert bool(cfg.model.filters) == (option in ("cnn", "lenet5"))
    else:
        assert (cfg.tracking.uri is None) == (option == "local")  # local: resolved at run time


def test_overrides_reach_the_typed_config():
    cfg = validate(compose("epochs=2", "batch_size=64", "folds=3", "width=16", "model=cnn"))
    assert (cfg.epochs, cfg.batch_size, cfg.folds, cfg.width) == (2, 64, 3, 16)
    assert cfg.model.filters == [32, 64]


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("epochs=0", "epochs"),
        ("epochs=abc", "epochs"),
        ("batch_size=0", "batch_size"),
        ("folds=1", "folds"),
        ("width=0", "width"),
        ("width=-3", "width"),
        ("+foo=1", "foo"),
        ("+model.nope=1", "model.nope"),
        ("dataset.name=bogus", "dataset.name"),
        ("model.dropout=1.5", "model.dropout"),
        ("model.depth=two", "model.depth"),
        ("model.learning_rate=0", "model.learning_rate"),
        ("dataset.timeout=0", "dataset.timeout"),
        ("dataset.retries=-1", "dataset.retries"),
        (("dataset=digits", "dataset.test_fraction=1"), "dataset.test_fraction"),
        ("seed=-1", "seed"),
        ("seed=4294967296", "seed"),  # NumPy's limit: 2**32 - 1
        ("validation_split=1.0", "validation_split"),
    ],
)
def test_invalid_value_raises_config_error_naming_the_key(override, key):
    overrides = override if isinstance(override, tuple) else (override,)
    cfg = compose(*overrides)
    with pytest.raises(ConfigError) as excinfo:
        validate(cfg)
    message = str(excinfo.value)
    assert names_key(message, key), message
    assert "\n" not in message  # one clean line, not OmegaConf's context dump
    assert "Fix:" in message or "did you mean" in message or "valid keys" in message, message


@pytest.mark.parametrize("override", ["width=abc", "batch_size=1.5", "model.depth=two"])
def test_a_value_of_the_wrong_type_names_the_key_value_and_fix(override):
    key, value = override.split("=")
    with pytest.raises(ConfigError) as excinfo:
        validate(compose(override))
    message = str(excinfo.value)
    assert message.startswith(f"{key}={value} is invalid: ") and "Fix: " in message, message


def test_cnn_without_conv_layers_is_rejected():
    with pytest.raises(ConfigError, match=r"model\.filters"):
        validate(compose("model=cnn", "model.filters=[]"))


def test_lenet5_takes_exactly_two_conv_layers():
    assert validate(compose("model=lenet5")).model.filters == [6, 16]
    assert validate(compose("model=lenet5", "model.filters=[8,32]")).model.filters == [8, 32]
    for filters in ("[]", "[6]", "[6,16,32]"):
        with pytest.raises(ConfigError, match=r"model\.filters=.*exactly 2 conv layers"):
            validate(compose("model=lenet5", f"model.filters={filters}"))


def test_the_schema_takes_its_model_names_from_the_builders():
    """A model type is one builder in ARCHITECTURES and one conf/model/<name>.yaml."""
    from pipeline.core.models import ARCHITECTURES

    assert set(ARCHITECTURES) == GROUP_OPTIONS["model"]
    with pytest.raises(ConfigError) as raised:
        validate({"model": {"name": "resnet"}})
    assert names_key(str(raised.value), "model.name")
    assert all(name in str(raised.value) for name in ARCHITECTURES)


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("+epoch=3", "(did you mean 'epochs'?)"),
        ("+model.optimiser=adam", "(did you mean 'model.optimizer'?)"),
        ("+anything=1", "(valid keys: dataset, model, tracking, crossval, epochs, batch_size,"),
    ],
)
def test_an_unknown_key_is_answered_with_the_closest_valid_one(override, expected):
    """A misspelt key (`dvc exp run -S +epoch=3`) names the key the schema has (difflib's
    closest), or the valid keys at that level when none is close."""
    with pytest.raises(ConfigError) as raised:
        validate(compose(override))
    assert expected in str(raised.value) and "\n" not in str(raised.value), raised.value


def test_validate_accepts_a_plain_dict():
    assert validate({"epochs": 3, "model": {"name": "cnn", "filters": [8]}}).epochs == 3
    with pytest.raises(ConfigError, match=r"'model\.nope'"):
        validate({"model": {"nope": 1}})


def test_train_cli_rejects_bad_config_cleanly_before_any_work(cli, tmp_path):
    result = cli(tmp_path, "pipeline.train", "epochs=0")
    assert result.returncode != 0
    assert names_key(result.stderr, "epochs"), result.stderr
    assert "error: epochs=0" in result.stderr
    assert "Traceback" not in result.stderr
    for output in ("models", "metrics", "runs", "plots", "mlflow.db", "data"):
        assert not (tmp_path / output).exists(), output


def test_train_cli_bad_config_does_not_import_tensorflow(tmp_path):
    """Validation runs before the heavy imports: a typo costs no TensorFlow start-up."""
    probe = textwrap.dedent(
        """
        import runpy, sys
        sys.argv = ["pipeline.train", "epochs=0"]
        try:
            runpy.run_module("pipeline.train", run_name="__main__", alter_sys=True)
        except SystemExit as exit:
            print("EXIT", exit.code is not None and exit.code != 0)
        print("LOADED", sorted(m for m in ("tensorflow", "keras") if m in sys.modules))
        """
    )
    (tmp_path / "probe.py").write_text(probe)
    result = subprocess.run(
        [sys.executable, "probe.py"],
        cwd=tmp_path,
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "EXIT True" in result.stdout, result.stdout + result.stderr
    assert "LOADED []" in result.stdout, result.stdout


def test_cfg_job_prints_the_resolved_config(cli, tmp_path):
    result = cli(tmp_path, "pipeline.fetch", "~experiment", "--cfg", "job")  # conf/'s defaults
    assert result.returncode == 0, result.stderr
    assert "epochs: 5" in result.stdout
    assert "name: mnist" in result.stdout
    assert not (tmp_path / "data").exists()  # printing the config does no work

    result = cli(tmp_path, "pipeline.fetch", "epochs=7", "dataset=digits", "--cfg", "job")
    assert result.returncode == 0, result.stderr
    assert "epochs: 7" in result.stdout
    assert "name: digits" in result.stdout


# --------------------------------------------------------------------------- installed commands

COMMANDS = ("fetch", "preprocess", "train", "crossval", "report",
            "compare", "predict", "registry", "params", "runs")  # fmt: skip


def _installed(name: str) -> str:
    path = os.path.join(os.path.dirname(sys.executable), f"digit-{name}")
    assert os.access(path, os.X_OK), f"{path} is not installed: reinstall (`make setup`)"
    return path


@pytest.mark.parametrize("name", COMMANDS)
def test_every_stage_and_command_is_an_installed_command(name):
    done = subprocess.run([_installed(name), "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip()


@pytest.mark.parametrize(
    ("line", "expected"),
    [("digit-train epo", "epochs="), ("digit-train model=", "model=lenet5"),
     ("digit-crossval crossval.", "crossval.stratified=")],
)  # fmt: skip
def test_hydra_shell_completion_completes_keys_and_group_options(line, expected, tmp_path):
    """What `eval "$(digit-train -sc install=bash)"` makes bash ask on <TAB>: Hydra completes an
    installed command, never `python -m pipeline.train`."""
    command = _installed(line.split()[0].removeprefix("digit-"))

    def shell_completion(verb: str, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [command, "-sc", verb],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=tmp_path,
            env={**os.environ, **env},
        )

    install = shell_completion("install=bash")
    assert f"-F hydra_bash_completion {os.path.basename(command)}" in install.stdout
    query = shell_completion("query=bash", COMP_LINE=line)
    assert query.returncode == 0, query.stderr
    assert expected in query.stdout.split(), query.stdout


def test_help_lists_every_key_with_its_meaning(cli, tmp_path):
    """`--help` is the project's own page (hydra.help in conf/config.yaml), not Hydra's default:
    every key the schema has, except the group choices and the files a dataset YAML lists."""
    import dataclasses

    done = cli(tmp_path, "pipeline.train", "--help")
    assert done.returncode == 0, done.stderr
    assert "python -m pipeline.train [KEY=VALUE ...]" in done.stdout
    assert "training epochs (>= 1)" in done.stdout

    def keys(schema: object, prefix: str = "") -> list[str]:
        found = []
        for f in dataclasses.fields(schema):
            value = getattr(schema, f.name)
            if dataclasses.is_dataclass(value):
                found += keys(value, f"{prefix}{f.name}.")
            else:
                found.append(prefix + f.name)
        return found

    not_keys = ("dataset.name", "model.name", "dataset.files", "dataset.train.", "dataset.test.")
    missing = [
        k for k in keys(Config()) if not k.startswith(not_keys) and f"{k}=" not in done.stdout
    ]
    assert not missing, f"--help does not explain {missing}"
