"""difftune.dashboard: the Streamlit app over the store's API (``difftune dashboard``).

The app (:data:`APP_FILE`) reads the database through :mod:`difftune.store` only and finds it where
every command does: ``$DIFFTUNE_STORAGE``, else ``sqlite:///difftune.db``; ``difftune dashboard
--storage URL`` sets that variable for the server it starts. Importing this package imports neither
Streamlit nor the store (the CLI builds the server's command line from it)::

    difftune dashboard                      # http://127.0.0.1:8501
    difftune dashboard --storage postgresql+psycopg://user:password@host/db --port 8600

Pages: models and their studies; a study's Pareto front (any stored quality metric against speedup
or latency, baselines / seeds / searched points drawn apart, filtered with the ``--select`` grammar);
a point's detail (cache-mask heatmaps, the solver's timeline, SADA's phases, per-layer bits, its
thumbnails beside the reference's, calibration and held-out metrics); two points side by side; the
hypervolume against the trial number; and an export button that writes what ``difftune export``
writes.
"""

from __future__ import annotations

import sys
from pathlib import Path

__all__ = ["APP_FILE", "DEFAULT_HOST", "DEFAULT_PORT", "streamlit_command"]

#: The Streamlit script (``streamlit run`` takes a file).
APP_FILE = Path(__file__).resolve().with_name("app.py")
#: Loopback only unless ``--host`` says otherwise: the dashboard has no login.
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8501


def streamlit_command(host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> list[str]:
    """The command line that serves the app on ``host:port`` with this Python: headless (no browser is
    opened), no usage statistics, no file watcher (an installed app does not change under it). ``-P``
    keeps the working directory off ``sys.path``: a ``click.py`` or ``plotly.py`` there must not
    shadow the server's own imports."""
    return [
        sys.executable,
        "-P",
        "-m",
        "streamlit",
        "run",
        str(APP_FILE),
        "--server.address",
        host,
        "--server.port",
        str(port),
        "--server.headless",
        "true",
        "--server.fileWatcherType",
        "none",
        "--server.runOnSave",
        "false",
        "--browser.gatherUsageStats",
        "false",
        "--client.toolbarMode",
        "minimal",
    ]
