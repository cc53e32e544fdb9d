"""Typed schema of `conf/`: every stage validates its Hydra config here before doing any work."""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from pipeline.core.models import ARCHITECTURES
from pipeline.infra.errors import ConfigError, first_line
from pipeline.infra.paths import CONF_DIR


@dataclass
class IdxPair:
    """One split's two IDX files, by name (for a downloaded dataset, keys of dataset.files)."""

    images: str
    labels: str


@dataclass
class DatasetConfig:
    name: str = "mnist"  # a conf/dataset/<name>.yaml; also data/raw/<name>/
    mirrors: list[str] = field(default_factory=list)
    # file name -> SHA-256 of its decompressed (raw IDX) bytes
    files: dict[str, str] = field(default_factory=dict)
    # Which file is which (MNIST's names by default; digits writes its IDX files under these).
    train: IdxPair = field(
        default_factory=lambda: IdxPair("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz")
    )
    test: IdxPair = field(
        default_factory=lambda: IdxPair("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
    )
    timeout: float = 30.0
    retries: int = 2
    # The most one file may take, downloaded or decompressed (MB, 10^6 bytes): a mirror that
    # sends more, or a gzip bomb, is cut off there. MNIST's largest file is 47 MB decompressed.
    max_file_mb: float = 64.0
    test_fraction: float = 0.25
    split_seed: int = 0  # digits only: its fixed train/test split

    @property
    def split_by_fetch(self) -> bool:
        """Whether fetch makes the train/test split itself (scikit-learn's digits, by
        test_fraction and split_seed) instead of downloading the dataset's own."""
        return self.name == "digits"

    def __post_init__(self) -> None:
        names = dataset_names()
        _require(self.name in names, "dataset.name", self.name, f"one of {names}")
        _require(self.timeout > 0, "dataset.timeout", self.timeout, "> 0 seconds")
        _require(self.retries >= 0, "dataset.retries", self.retries, ">= 0")
        _require(self.max_file_mb > 0, "dataset.max_file_mb", self.max_file_mb, "> 0 (MB)")
        _require(
            0 < self.test_fraction < 1, "dataset.test_fraction", self.test_fraction, "in (0, 1)"
        )
        # Which file is which: four different names, and for a downloaded dataset (one that
        # lists its files) exactly the files it fetches.
        roles = {
            f"dataset.{split}.{kind}": getattr(getattr(self, split), kind)
            for split in ("train", "test")
            for kind in ("images", "labels")
        }
        seen: set[str] = set()
        listed = sorted(self.files)
        for key, file in roles.items():
            _require(file not in seen, key, file, "a file name no other split or kind uses")
            seen.add(file)
            if listed:
                _require(file in listed, key, file, f"one of dataset.files {listed}")
        extra = sorted(set(self.files) - seen)
        expected = f"only the four files dataset.train and dataset.test name, not also {extra}"
        _require(not extra, "dataset.files", listed, expected)


def dataset_names() -> list[str]:
    """The datasets Hydra can compose: conf/dataset/*.yaml, plus those of a `--config-dir`'s
    dataset/ folder when a Hydra app is running. A new dataset is one such YAML file."""
    from hydra.core.global_hydra import GlobalHydra

    names = {path.stem for path in (CONF_DIR / "dataset").glob("*.yaml")}
    if GlobalHydra.instance().is_initialized():
        names |= set(GlobalHydra.instance().config_loader().get_group_options("dataset"))
    return sorted(names)


@dataclass
class ModelConfig:
    name: str = "mlp"
    depth: int = 1
    activation: str = "relu"
    dropout: float = 0.0
    optimizer: str = "rmsprop"
    learning_rate: float = 0.001
    filters: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        names = sorted(ARCHITECTURES)
        _require(self.name in ARCHITECTURES, "model.name", self.name, f"one of {names}")
        _require(self.depth >= 1, "model.depth", self.depth, ">= 1")
        _require(0 <= self.dropout < 1, "model.dropout", self.dropout, "in [0, 1)")
        _require(self.learning_rate > 0, "model.learning_rate", self.learning_rate, "> 0")
        _require(all(f >= 1 for f in self.filters), "model.filters", self.filters, "positive ints")
        architecture = ARCHITECTURES[self.name]
        ok = architecture.takes_filters(len(self.filters))
        _require(ok, "model.filters", self.filters, architecture.filters_expected())


# The project's own store: a sqlite file in the project root (see tracking.store_uri).
LOCAL_TRACKING_URI = "sqlite:///mlflow.db"


@dataclass
class TrackingConfig:
    uri: str | None = None  # None: MLFLOW_TRACKING_URI, else LOCAL_TRACKING_URI
    experiment: str | None = None
    system_metrics: bool = False  # MLflow's system/* metrics during each train and crossval run


@dataclass
class CrossvalConfig:
    shuffle: bool = True
    stratified: bool = False
    repeats: int = 1  # repeated k-fold: this many fold assignments, repeats x folds fold runs

    def __post_init__(self) -> None:
        _require(self.repeats >= 1, "crossval.repeats", self.repeats, ">= 1")
        _require(
            self.shuffle or self.repeats == 1,
            "crossval.repeats",
            self.repeats,
            "1 unless crossval.shuffle=true (unshuffled repeats are the same folds)",
        )


@dataclass
class Config:
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    crossval: CrossvalConfig = field(default_factory=CrossvalConfig)
    epochs: int = 5
    batch_size: int = 128
    folds: int = 5
    width: int = 512
    seed: int = 42
    deterministic: bool = False
    validation_split: float = 0.0
    threads: int = 0  # TensorFlow threads per process; 0 = OMP_NUM_THREADS, else all cores

    def __post_init__(self) -> None:
        _require(self.threads >= 0, "threads", self.threads, ">= 0 (0 = all cores)")
        _require(self.epochs >= 1, "epochs", self.epochs, ">= 1")
        _require(self.batch_size >= 1, "batch_size", self.batch_size, ">= 1")
        _require(self.folds >= 2, "folds", self.folds, ">= 2")
        _require(self.width >= 1, "width", self.width, ">= 1")
        # NumPy's and Keras' seeds are 32-bit unsigned.
        _require(0 <= self.seed < 2**32, "seed", self.seed, "in [0, 2**32)")
        _require(
            0 <= self.validation_split < 1, "validation_split", self.validation_split, "in [0, 1)"
        )

    def unused_keys(self) -> set[str]:
        """The flattened keys (e.g. "model.filters") that this run's dataset and model type
        never read: conv filters on an MLP, width and depth on LeNet-5 (its 120-84 head is the
        architecture), the split settings of a dataset that comes with its own test set."""
        ignored = ARCHITECTURES[self.model.name].ignores
        keys = {"width" if name == "width" else f"model.{name}" for name in ignored}
        if not self.dataset.split_by_fetch:
            keys |= {"dataset.test_fraction", "dataset.split_seed"}
        return keys


def _require(ok: bool, key: str, value: Any, expected: str) -> None:
    if not ok:
        raise ConfigError(
            f"{key}={value!r} is invalid: expected {expected}. "
            f"Fix: set {key} to a value {expected} (in conf/ or as {key}=... on the command line)"
        )


def validate(cfg: DictConfig | dict) -> Config:
    """Merge `cfg` over the schema and return typed, range-checked settings.

    Raises ConfigError naming the offending key for a wrong type, an unknown key or a value
    out of range. The schema is applied here rather than in conf/'s defaults list so that DVC's
    own Hydra composition (which does not import this package) can still compose conf/.
    """
    try:
        merged = OmegaConf.merge(OmegaConf.structured(Config), cfg)
        return OmegaConf.to_object(merged)  # type: ignore[return-value]  # runs __post_init__
    except ConfigError as err:
        # OmegaConf re-raises our error with its own context lines appended; keep the message.
        raise ConfigError(first_line(err)) from None
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        reason = first_line(err)
        if isinstance(err, ConfigKeyError):
            raise ConfigError(f"invalid config key '{key}': {reason}{closest_key(key)}") from None
        # A known key with a value of the wrong type (width=abc): OmegaConf's conversion message.
        value = getattr(err, "value", None)
        shown = f"{key}={value}" if value is not None else f"the value of {key}"
        raise ConfigError(
            f"{shown} is invalid: {reason}. Fix: give {key} a value of its type "
            "(`python -m pipeline.train --help` lists each key's type and range)"
        ) from None


def closest_key(key: str) -> str:
    """' (did you mean ...?)' naming the schema key nearest to the unknown dotted `key` (difflib's
    ratio, as argparse and git do), or the valid keys at that level when none is near."""
    parent, _, leaf = key.rpartition(".")
    schema = OmegaConf.structured(Config)
    node = OmegaConf.select(schema, parent) if parent else schema
    if not isinstance(node, DictConfig):
        return ""
    prefix = f"{parent}." if parent else ""
    valid = [str(name) for name in node]
    if close := difflib.get_close_matches(leaf, valid, n=1):
        return f" (did you mean '{prefix}{close[0]}'?)"
    return f" (valid keys{' of ' + parent if parent else ''}: {', '.join(valid)})"
