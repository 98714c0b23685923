"""Layout and import-weight guarantees from DESIGN.md."""

from __future__ import annotations

import importlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_serving_runtime_does_not_import_the_search_stack():
    code = (
        "import sys, pkgutil, importlib, difftune\n"
        "difftune.describe; difftune.load_pipeline; difftune.apply_profile; difftune.load_profile\n"
        "import difftune.models.embedded, difftune.accel, difftune.profile\n"
        "import difftune.benchmarks, difftune.metric_table\n"
        "for m in pkgutil.iter_modules(difftune.accel.__path__):\n"
        "    importlib.import_module('difftune.accel.' + m.name)\n"
        "difftune.accel.techniques()\n"
        "heavy = ('optuna', 'pymoo', 'sqlalchemy', 'streamlit')\n"
        "heavy += ('difftune.search', 'difftune.store', 'difftune.dashboard')\n"
        "print(' '.join(m for m in heavy if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


@pytest.mark.parametrize("folder", ["search", "spaces", "evaluators", "store", "dashboard"])
def test_top_level_folders_are_difftune_subpackages(folder):
    module = importlib.import_module(f"difftune.{folder}")
    assert Path(module.__file__).resolve() == ROOT / folder / "__init__.py"


def test_no_bare_top_level_modules_are_installed(tmp_path):
    # 'spaces' exists on PyPI: the install must not put difftune's folders on sys.path as bare packages.
    code = (
        "import importlib.util, json\n"
        "found = {}\n"
        "for name in ('search', 'spaces', 'evaluators', 'store', 'dashboard'):\n"
        "    spec = importlib.util.find_spec(name)\n"
        "    found[name] = list(spec.submodule_search_locations or []) if spec else []\n"
        "print(json.dumps(found))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path)
    for name, locations in json.loads(out.stdout).items():
        assert str(ROOT / name) not in locations, name


def test_every_error_is_a_difftune_error():
    import difftune

    for name in ("ProfileError", "ModelError", "SpaceError", "EvaluationError", "StoreError"):
        assert issubclass(getattr(difftune, name), difftune.DifftuneError)


def test_every_package_folder_is_listed_for_non_editable_installs():
    """pyproject lists packages explicitly (the folder mapping needs it): a new sub-package must be added."""
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    mapping = config["package-dir"]
    for package, folder in mapping.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(ROOT / folder)
            name = ".".join([package, *relative.parts]) if relative.parts else package
            assert name in listed, f"{name} is missing from [tool.setuptools] packages"
