"""``difftune dashboard``: what it starts, where it binds, its one-line errors (the server runs in test_browser.py)."""

from __future__ import annotations

import socket
import subprocess
import sys
from typing import Any

import pytest

from difftune.cli import main
from difftune.dashboard import APP_FILE
from tests.dashboard._chromium import free_port


@pytest.fixture
def started(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """The Streamlit servers the command would start (recorded, not run)."""
    calls: list[dict[str, Any]] = []

    class Server:
        def __init__(self, command: list[str], **kwargs: Any) -> None:
            calls.append({"command": command, **kwargs})

        def wait(self, timeout: float | None = None) -> int:
            return calls[-1].get("exit code", 0)

    monkeypatch.setattr(subprocess, "Popen", Server)
    return calls


def _option(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def test_it_serves_the_app_on_loopback_with_the_storage_url(started, capsys, tmp_path):
    url = f"sqlite:///{tmp_path / 'd.db'}"
    main(["dashboard", "--storage", url, "--port", "8642"])
    [call] = started
    command = call["command"]
    assert command[:5] == [sys.executable, "-P", "-m", "streamlit", "run"] and command[5] == str(APP_FILE)
    assert _option(command, "--server.address") == "127.0.0.1" and _option(command, "--server.port") == "8642"
    assert _option(command, "--server.headless") == "true"
    assert _option(command, "--browser.gatherUsageStats") == "false"
    assert call["env"]["DIFFTUNE_STORAGE"] == url
    out, err = capsys.readouterr()
    assert "http://127.0.0.1:8642" in out and url in out and not err
    assert not (tmp_path / "d.db").exists()  # the app says how to make it; the command does not create it


def test_another_host_is_bound_only_when_asked_and_warned_about(started, capsys, monkeypatch):
    monkeypatch.delenv("DIFFTUNE_STORAGE", raising=False)
    main(["dashboard", "--host", "0.0.0.0", "--port", str(free_port())])
    command = started[0]["command"]
    assert _option(command, "--server.address") == "0.0.0.0"
    assert started[0]["env"]["DIFFTUNE_STORAGE"] == "sqlite:///difftune.db"
    assert "has no login" in capsys.readouterr().err


def test_a_port_in_use_and_a_bad_url_are_one_line_errors(started, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(SystemExit) as exc:
            main(["dashboard", "--port", str(port)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"error: cannot serve on 127.0.0.1:{port}" in err and "--port" in err and err.count("\n") == 1
    with pytest.raises(SystemExit) as exc:
        main(["dashboard", "--storage", "not a url"])
    assert exc.value.code == 2 and "is not a database URL" in capsys.readouterr().err
    assert not started


def test_a_server_that_fails_is_reported(monkeypatch, capsys):
    class Failing:
        def __init__(self, command: list[str], **kwargs: Any) -> None:
            pass

        def wait(self, timeout: float | None = None) -> int:
            return 3

    monkeypatch.setattr(subprocess, "Popen", Failing)
    with pytest.raises(SystemExit) as exc:
        main(["dashboard", "--port", str(free_port())])
    assert exc.value.code == 2
    assert "the Streamlit server stopped with exit code 3" in capsys.readouterr().err
