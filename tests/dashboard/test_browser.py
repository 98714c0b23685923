"""``difftune dashboard`` in a real browser: the server starts over a seeded study, headless Chromium renders its front.

Skips when Chromium is not installed, unless ``CI_REQUIRE_CHROMIUM=1`` (``.ci/run`` installs Debian's
``chromium`` and sets it), which makes its absence a failure. The screenshot is the README's
``docs/dashboard.png``.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.dashboard._chromium import find_chromium, free_port, render
from tests.dashboard._seed import CACHE_FRONT, CACHE_STUDY, CACHE_TRIALS

REQUIRE_CHROMIUM_ENV = "CI_REQUIRE_CHROMIUM"
SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "dashboard.png"


def _chromium() -> str:
    found = find_chromium()
    if found is None:
        reason = "chromium is not installed (sudo apt-get install chromium; .ci/run installs it)"
        if os.environ.get(REQUIRE_CHROMIUM_ENV) == "1":
            pytest.fail(f"{reason}, and ${REQUIRE_CHROMIUM_ENV}=1 requires it", pytrace=False)
        pytest.skip(reason)
    return found


def _wait_until_served(server: subprocess.Popen[str], port: int, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if server.poll() is not None:
            output = server.stdout.read() if server.stdout else ""
            pytest.fail(f"difftune dashboard exited with code {server.returncode}:\n{output}", pytrace=False)
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"difftune dashboard did not answer on port {port} within {timeout:g} s", pytrace=False)
        time.sleep(0.25)


def _stop(server: subprocess.Popen[str]) -> str:
    """Ctrl-C the command and its Streamlit server (their own process group), as a user would; then collect output."""
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGINT)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=20)
    return server.stdout.read() if server.stdout else ""


def test_the_front_of_a_seeded_study_renders_in_headless_chromium(seeded_db, tmp_path):
    chromium = _chromium()
    shutil.copy(seeded_db, tmp_path / "difftune.db")  # the default storage of the working directory, as a user has
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "difftune.cli", "dashboard", "--port", str(port)],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: the Streamlit server is stopped with it
        env={k: v for k, v in os.environ.items() if k != "DIFFTUNE_STORAGE"},
    )
    try:
        _wait_until_served(server, port)
        page = render(
            chromium,
            f"http://127.0.0.1:{port}/?study={CACHE_STUDY}",
            wait_for_text=[CACHE_STUDY, f"Pareto front: {len(CACHE_FRONT)} points"],
            wait_for_selector=[".js-plotly-plot .main-svg", ".scatterlayer .point"],
            screenshot=SCREENSHOT,
        )
    finally:
        output = _stop(server)
    assert f"difftune dashboard: http://127.0.0.1:{port}  (storage sqlite:///difftune.db" in output
    assert CACHE_STUDY in page.html and "js-plotly-plot" in page.html  # the study's name and plotly's chart
    # every complete trial is a marker of the chart (the legend's sample markers carry no trial)
    assert page.html.count('class="point plotly-customdata"') == len(CACHE_TRIALS)
    assert "19 complete" in page.text and f"{len(CACHE_FRONT)} on the front" in page.text
    assert "Traceback" not in page.text
    assert SCREENSHOT.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
