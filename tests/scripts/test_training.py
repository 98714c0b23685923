"""The training scripts are deterministic for a seed (and thread count), and print loss and time."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _train(script: str, out: Path, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / script), "--out", str(out), "--threads", "1", *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    return result.stdout


def _weights(folder: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(folder.rglob("*.safetensors")))


def test_train_embedded_is_deterministic(tmp_path):
    args = ("--steps", "3", "--batch-size", "8", "--checkpoint-every", "0")
    log = _train("train_embedded.py", tmp_path / "a", *args)
    _train("train_embedded.py", tmp_path / "b", *args)
    assert "done: 3 steps in" in log
    assert _weights(tmp_path / "a") == _weights(tmp_path / "b")
    assert (tmp_path / "a" / "model_index.json").is_file()
    _train("train_embedded.py", tmp_path / "c", *args[:-2], "--seed", "1", "--checkpoint-every", "0")
    assert _weights(tmp_path / "c") != _weights(tmp_path / "a")


def test_train_classifier_is_deterministic(tmp_path):
    log = _train("train_classifier.py", tmp_path / "a", "--epochs", "1")
    _train("train_classifier.py", tmp_path / "b", "--epochs", "1")
    assert "done in" in log
    assert _weights(tmp_path / "a") == _weights(tmp_path / "b")
