"""Headless Chromium driven over the DevTools protocol, for the dashboard's browser test.

``chromium --headless --dump-dom --virtual-time-budget=…`` alone is not enough for a Streamlit page:
the page draws itself from messages on a websocket, and virtual time runs out while it waits for
them (half the dumps here were the loading skeleton). So the browser is started with the same flags
and a DevTools port, and asked in real time until the page shows what the test waits for; then its
DOM and a screenshot are taken. The ``websockets`` client is a dependency of Streamlit itself.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from websockets.sync.client import connect

#: The flags the issue names, plus a DevTools port (chosen free at start).
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
)


def find_chromium() -> str | None:
    """Debian's ``chromium`` (or another Chromium / Chrome on PATH), or None."""
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Page:
    """What the browser rendered: the DOM's HTML and the visible text."""

    html: str
    text: str


class _DevTools:
    def __init__(self, ws: Any) -> None:
        self._ws = ws
        self._next = 0

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        self._next += 1
        self._ws.send(json.dumps({"id": self._next, "method": method, "params": params}))
        while True:
            message = json.loads(self._ws.recv(timeout=60))
            if message.get("id") == self._next:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return dict(message.get("result") or {})

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result.get("result", {}).get("value")


def render(
    chromium: str,
    url: str,
    *,
    wait_for_text: Sequence[str] = (),
    wait_for_selector: Sequence[str] = (),
    screenshot: Path | None = None,
    window: tuple[int, int] = (1400, 1000),
    timeout: float = 60.0,
) -> Page:
    """Load ``url`` in a fresh headless Chromium profile, wait until the page's text holds every
    ``wait_for_text`` and every CSS ``wait_for_selector`` matches, then return its DOM (and save a PNG
    screenshot of the window to ``screenshot``).

    Raises:
        TimeoutError: the page did not show them within ``timeout`` seconds (the message shows its text).
    """
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="difftune-chromium-", ignore_cleanup_errors=True) as profile:
        process = subprocess.Popen(
            [
                chromium,
                *FLAGS,
                f"--user-data-dir={profile}",
                f"--window-size={window[0]},{window[1]}",
                f"--remote-debugging-port={port}",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # its helper processes share the group: stopped together below
        )
        try:
            with connect(_page_socket(port, process, timeout), max_size=None, open_timeout=20) as ws:
                return _load(_DevTools(ws), url, wait_for_text, wait_for_selector, screenshot, timeout)
        finally:
            _stop(process)


def _load(
    devtools: _DevTools,
    url: str,
    wait_for_text: Sequence[str],
    wait_for_selector: Sequence[str],
    screenshot: Path | None,
    timeout: float,
) -> Page:
    """Navigate, poll in real time until the page shows what is waited for, then read it (and shoot it)."""
    devtools.call("Page.enable")
    devtools.call("Page.navigate", url=url)
    deadline = time.monotonic() + timeout
    text = ""
    while True:
        text = devtools.evaluate("document.body ? document.body.innerText : ''") or ""
        found = all(t in text for t in wait_for_text) and all(
            devtools.evaluate(f"document.querySelector({json.dumps(s)}) !== null") for s in wait_for_selector
        )
        if found:
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not show {list(wait_for_text)} {list(wait_for_selector)}: {text!r}")
        time.sleep(0.25)
    time.sleep(1.0)  # let plotly finish its first draw and Streamlit its transitions
    html = devtools.evaluate("document.documentElement.outerHTML") or ""
    text = devtools.evaluate("document.body.innerText") or ""
    if screenshot is not None:
        shot = devtools.call("Page.captureScreenshot", format="png")
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        screenshot.write_bytes(base64.b64decode(shot["data"]))
    return Page(html=html, text=text)


def _page_socket(port: int, process: subprocess.Popen[bytes], timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"chromium exited with code {process.returncode} before it served DevTools")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json", timeout=5) as response:
                targets = json.load(response)
            pages = [t for t in targets if t.get("type") == "page" and t.get("webSocketDebuggerUrl")]
            if pages:
                return str(pages[0]["webSocketDebuggerUrl"])
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"chromium's DevTools did not answer on port {port}")
        time.sleep(0.2)


def _stop(process: subprocess.Popen[bytes]) -> None:
    """End the browser this module started and the helper processes of its process group."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
    except ProcessLookupError:
        pass
    else:
        try:  # helpers that outlived the browser itself
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
