"""scripts/gpu_check.py runs its whole path (calibrate → export → apply) on the CPU too, so it cannot rot."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.usefixtures("one_thread")


def test_gpu_check_runs_its_path_on_the_cpu(tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "figures.json"
    code = module.main(["--device", "cpu", "--budget", "2", "--samples", "2", "--steps", "4", "--json", str(out)])
    figures = json.loads(out.read_text())["gpu_check"]
    assert code == 0 and [f["model"] for f in figures] == ["embedded", "tiny-sd"]
    for f in figures:
        assert f["device"] == "cpu" and f["trials"] == 2 and f["failed"] == 0
        assert f["apply"]["finite"] and f["apply"]["restored_bit_for_bit"] and f["apply"]["plain_ms"] > 0
        assert "psnr" in f["exported"]["held_out"]
