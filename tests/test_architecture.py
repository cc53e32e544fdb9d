"""The import rules of the three rooms (docs/ARCHITECTURE.md), checked on the source with `ast`.

- the top of pipeline/ holds exactly the runnable modules (the five stages and the five
  commands), each with an entry point, and none of them imports another;
- pipeline/core/ (the science) imports no Hydra, OmegaConf or MLflow, and from the pipeline only
  pipeline.core.* and the two leaf modules pipeline.infra.errors and pipeline.infra.files;
- those two leaves import nothing core could not import itself (so core's rule holds for
  everything core runs, not just for what it names);
- pipeline/infra/ (the plumbing) imports no runnable module;
- no test module imports another (or conftest): shared helpers live in tests/run_helpers.py,
  shared fixtures in tests/conftest.py.

Every import counts, at the top of a module or inside a function. The rules are one function over
{path: source}; the real tree must give no violation, and each rule is shown to fire on a small
synthetic tree that breaks it, so the check cannot pass vacuously.
"""

from __future__ import annotations

import ast

import pytest
from run_helpers import PROJECT_ROOT, STAGES

COMMANDS = {"compare", "predict", "registry", "params", "runs"}
RUNNABLE = {f"pipeline.{name}" for name in {*STAGES} | COMMANDS}
# Packages core may never import, not even inside a function: the science runs without them.
FRAMEWORKS = {"hydra", "omegaconf", "mlflow"}
LEAVES = {"pipeline.infra.errors", "pipeline.infra.files"}  # the only infra core may import


def _module_name(path: str) -> str:
    """'pipeline/core/models.py' -> 'pipeline.core.models'; a package's __init__ -> the package."""
    parts = path.removesuffix(".py").split("/")
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: str, source: str, modules: set[str]) -> set[str]:
    """Every module `source` imports, anywhere in it, as absolute dotted names.

    `from pkg import name` counts as importing `pkg.name` when that is one of `modules` (a
    submodule), else as importing `pkg`; relative imports are resolved against `path`.
    """
    package = _module_name(path)
    if not path.endswith("__init__.py"):
        package = package.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source, filename=path)):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.add(candidate if candidate in modules else base)
    return found


def _has_entry_point(source: str) -> bool:
    """True if the module runs as `python -m`: an `if __name__ == "__main__":` block or a
    function decorated with @hydra.main(...)."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.If) and ast.unparse(node.test).replace("'", '"') in (
            '__name__ == "__main__"',
            '"__main__" == __name__',
        ):
            return True
        if isinstance(node, ast.FunctionDef) and any(
            ast.unparse(d).startswith("hydra.main(") for d in node.decorator_list
        ):
            return True
    return False


def violations(sources: dict[str, str]) -> list[str]:
    """Every broken rule in a tree given as {'pipeline/...py': source}, one line each."""
    modules = {_module_name(path) for path in sources}
    found: list[str] = []

    top = {_module_name(p) for p in sources if p.count("/") == 1} - {"pipeline"}
    for name in sorted(top - RUNNABLE):
        found.append(f"{name}: not a stage or command, so it belongs in pipeline/core or infra")
    for name in sorted(RUNNABLE - top):
        found.append(f"{name}: missing from the top of pipeline/")

    for path, source in sorted(sources.items()):
        name = _module_name(path)
        imported = _imports(path, source, modules)
        ours = {m for m in imported if m == "pipeline" or m.startswith("pipeline.")}
        if name in RUNNABLE and not _has_entry_point(source):
            found.append(f"{name}: a runnable module without `if __name__ == '__main__'`")
        if name in top or name.startswith("pipeline.infra."):
            for other in sorted(ours & (RUNNABLE - {name})):
                found.append(f"{name} imports the runnable module {other}")
        if name.startswith("pipeline.core") or name in LEAVES:
            for m in sorted(imported):
                if m.split(".")[0] in FRAMEWORKS:
                    found.append(f"{name} imports {m} (core and its leaves use no framework)")
            allowed = {m for m in ours if m.startswith("pipeline.core.") or m in LEAVES}
            for m in sorted(ours - allowed - {"pipeline.core"}):
                found.append(
                    f"{name} imports {m} (core imports only pipeline.core.*, "
                    "pipeline.infra.errors and pipeline.infra.files)"
                )
    return found


def _tree() -> dict[str, str]:
    root = PROJECT_ROOT / "pipeline"
    return {
        p.relative_to(PROJECT_ROOT).as_posix(): p.read_text(encoding="utf-8")
        for p in sorted(root.rglob("*.py"))
    }


# --------------------------------------------------------------------------- the real tree


def test_the_tree_follows_the_import_rules() -> None:
    found = violations(_tree())
    assert not found, "\n".join(found)


def test_the_tree_is_read_whole() -> None:
    """The check sees every room and resolves the imports it holds (guards a vacuous pass)."""
    tree = _tree()
    assert {p.split("/")[1] for p in tree if p.count("/") == 2} >= {"core", "infra"}
    stage = _imports("pipeline/train.py", tree["pipeline/train.py"], set(map(_module_name, tree)))
    assert "pipeline.infra.stage" in stage  # `from pipeline.infra.stage import run_stage`


# --------------------------------------------------------------------------- each rule can fail

MAIN = 'if __name__ == "__main__":\n    main()\n'
HYDRA_MAIN = (
    "import hydra\n"
    '@hydra.main(version_base="1.3", config_path="../conf", config_name="config")\n'
    "def main(cfg):\n    pass\n"
)


def _good_tree() -> dict[str, str]:
    """A minimal tree that follows every rule: each stage and command a bare entry point."""
    tree = {f"pipeline/{n}.py": HYDRA_MAIN for n in sorted(STAGES)}
    tree |= {f"pipeline/{n}.py": MAIN for n in sorted(COMMANDS)}
    return tree | {
        "pipeline/__init__.py": "",
        "pipeline/core/__init__.py": "",
        "pipeline/core/data.py": "import numpy\nfrom pipeline.infra.errors import DataError\n",
        "pipeline/core/models.py": (
            "from pipeline.core.data import NUM_CLASSES\n"
            "from pipeline.infra import files\n"
            "from . import data\n"
        ),
        "pipeline/infra/__init__.py": "",
        "pipeline/infra/errors.py": "class DataError(Exception):\n    pass\n",
        "pipeline/infra/files.py": "from pipeline.infra.errors import DataError\n",
        "pipeline/infra/tracking.py": "import mlflow\nfrom pipeline.core import models\n",
        "pipeline/infra/callbacks.py": "from pipeline.infra.tracking import x\n",
    }


def test_a_tree_that_follows_the_rules_passes() -> None:
    assert violations(_good_tree()) == []


INSIDE_A_FUNCTION = "def f():\n    import {module}\n"


@pytest.mark.parametrize(
    ("path", "source", "expected"),
    [
        # core uses no framework, not even inside a function
        ("pipeline/core/models.py", "import mlflow\n", "pipeline.core.models imports mlflow"),
        (
            "pipeline/core/models.py",
            INSIDE_A_FUNCTION.format(module="mlflow"),
            "pipeline.core.models imports mlflow",
        ),
        ("pipeline/core/data.py", "from omegaconf import DictConfig\n", "imports omegaconf"),
        ("pipeline/core/data.py", "from hydra.core import x\n", "imports hydra.core"),
        # core imports from infra only the leaves
        (
            "pipeline/core/models.py",
            "from pipeline.infra.config import Config\n",
            "pipeline.core.models imports pipeline.infra.config",
        ),
        (
            "pipeline/core/models.py",
            "from pipeline.infra import tracking\n",
            "pipeline.core.models imports pipeline.infra.tracking",
        ),
        (
            "pipeline/core/data.py",
            INSIDE_A_FUNCTION.format(module="pipeline.infra.tracking"),
            "pipeline.core.data imports pipeline.infra.tracking",
        ),
        (
            "pipeline/core/data.py",
            "from ..infra.tracking import x\n",
            "pipeline.core.data imports pipeline.infra.tracking",
        ),
        ("pipeline/core/data.py", "from pipeline import train\n", "imports pipeline.train"),
        # the leaves core relies on stay leaves
        (
            "pipeline/infra/files.py",
            "from pipeline.infra.config import Config\n",
            "pipeline.infra.files imports pipeline.infra.config",
        ),
        ("pipeline/infra/errors.py", "import hydra\n", "pipeline.infra.errors imports hydra"),
        # no runnable module imports another
        (
            "pipeline/train.py",
            HYDRA_MAIN + "from pipeline.preprocess import load_split\n",
            "pipeline.train imports the runnable module pipeline.preprocess",
        ),
        (
            "pipeline/predict.py",
            MAIN + INSIDE_A_FUNCTION.format(module="pipeline.registry"),
            "pipeline.predict imports the runnable module pipeline.registry",
        ),
        (
            "pipeline/report.py",
            HYDRA_MAIN + "from pipeline import compare\n",
            "pipeline.report imports the runnable module pipeline.compare",
        ),
        (
            "pipeline/report.py",
            HYDRA_MAIN + "from . import compare\n",
            "pipeline.report imports the runnable module pipeline.compare",
        ),
        # infra imports no runnable module
        (
            "pipeline/infra/callbacks.py",
            "from pipeline.compare import load_runs\n",
            "pipeline.infra.callbacks imports the runnable module pipeline.compare",
        ),
        # the top holds exactly the runnable modules, each with an entry point
        ("pipeline/model.py", "X = 1\n", "pipeline.model: not a stage or command"),
        ("pipeline/fetch.py", "def fetch():\n    pass\n", "pipeline.fetch: a runnable module"),
    ],
)
def test_each_rule_fails_when_broken(path: str, source: str, expected: str) -> None:
    tree = _good_tree()
    tree[path] = source
    found = violations(tree)
    assert any(expected in line for line in found), found


def test_a_missing_runnable_module_is_a_violation() -> None:
    tree = _good_tree()
    del tree["pipeline/registry.py"]
    assert violations(tree) == ["pipeline.registry: missing from the top of pipeline/"]


# --------------------------------------------------------------------------- the tests' own rule


def cross_test_imports(sources: dict[str, str]) -> list[str]:
    """Every import of a test module (or of conftest, which pytest loads itself) by a module of
    tests/, given as {'tests/...py': source}, one line each."""
    forbidden = {_module_name(p).split(".")[-1] for p in sources if p.startswith("tests/test_")}
    found: list[str] = []
    for path, source in sorted(sources.items()):
        for module in sorted(_imports(path, source, set())):
            top = module.split(".")[0]
            if top in forbidden | {"conftest"}:
                found.append(
                    f"{path} imports {top} (shared helpers go in run_helpers.py, "
                    "fixtures in conftest.py)"
                )
    return found


def _test_tree() -> dict[str, str]:
    return {
        p.relative_to(PROJECT_ROOT).as_posix(): p.read_text(encoding="utf-8")
        for p in sorted((PROJECT_ROOT / "tests").glob("*.py"))
    }


def test_no_test_module_imports_another() -> None:
    tree = _test_tree()
    assert {"tests/conftest.py", "tests/run_helpers.py", "tests/test_architecture.py"} <= set(tree)
    found = cross_test_imports(tree)
    assert not found, "\n".join(found)


GOOD_TESTS = {
    "tests/conftest.py": "import pytest\nfrom run_helpers import settings\n",
    "tests/run_helpers.py": "import os\n",
    "tests/test_predict.py": "from run_helpers import render\n",
    "tests/test_serving.py": "import run_helpers\nfrom pipeline import predict\n",
}


def test_test_modules_that_share_only_through_run_helpers_pass() -> None:
    assert cross_test_imports(GOOD_TESTS) == []


@pytest.mark.parametrize(
    ("path", "source", "expected"),
    [
        ("tests/test_serving.py", "from test_predict import render\n", "imports test_predict"),
        ("tests/test_serving.py", "import test_predict\n", "imports test_predict"),
        ("tests/test_serving.py", INSIDE_A_FUNCTION.format(module="test_predict"), "test_predict"),
        ("tests/test_predict.py", "from conftest import TRAINED_EPOCHS\n", "imports conftest"),
        ("tests/run_helpers.py", "from test_predict import render\n", "imports test_predict"),
    ],
)
def test_a_test_module_importing_another_is_a_violation(
    path: str, source: str, expected: str
) -> None:
    tree = dict(GOOD_TESTS)
    tree[path] = source
    found = cross_test_imports(tree)
    assert len(found) == 1 and path in found[0] and expected in found[0], found
