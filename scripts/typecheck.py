#!/usr/bin/env python
"""Run mypy over the whole `difftune` import package, mapped folders included.

pyproject.toml maps search/ spaces/ evaluators/ store/ dashboard/ to difftune.search, … mypy cannot
follow that mapping (nor the editable install's import hook), so this builds the package as Python
sees it, out of symlinks in a temporary folder, and checks that. Extra arguments go to mypy.

    python scripts/typecheck.py
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    with tempfile.TemporaryDirectory(prefix="difftune-mypy-") as tmp:
        tree = Path(tmp) / "difftune"
        tree.mkdir()
        for entry in (ROOT / "difftune").iterdir():
            (tree / entry.name).symlink_to(entry)
        for package, folder in config.items():
            if package != "difftune":
                (tree / package.split(".", 1)[1]).symlink_to(ROOT / folder)
        env = {**os.environ, "MYPYPATH": tmp}
        command = [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"), "-p", "difftune"]
        return subprocess.call([*command, *sys.argv[1:]], env=env, cwd=tmp)


if __name__ == "__main__":
    raise SystemExit(main())
