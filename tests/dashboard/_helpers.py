"""Reading what the dashboard drew, in AppTest."""

from __future__ import annotations

import json
from typing import Any


def chart(app: Any, key: str) -> dict[str, Any]:
    """The plotly figure (its JSON) the app drew under ``key``."""
    [element] = [e for e in app.get("plotly_chart") if e.key == key]
    return dict(json.loads(element.proto.spec))


def charts(app: Any) -> list[str]:
    """The keys of the plotly charts on the page, in order."""
    return [str(e.key) for e in app.get("plotly_chart")]


def images(app: Any) -> list[list[str]]:
    """Per ``st.image`` call, the captions of its images."""
    return [[i.caption for i in element.proto.imgs] for element in app.image]


def drawn_trials(figure: dict[str, Any]) -> dict[str, list[int]]:
    """Trace name → the trial numbers of its points (their ``customdata``)."""
    return {
        trace.get("name", ""): [int(c[0]) for c in trace["customdata"]]
        for trace in figure["data"]
        if trace.get("customdata")
    }


def texts(elements: Any) -> list[str]:
    return [str(e.value) for e in elements]
