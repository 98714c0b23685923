"""The dashboard's plotly figures, built from :mod:`difftune.dashboard._data` (no Streamlit here)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from difftune.dashboard._data import (
    KIND_STYLE,
    HypervolumePoint,
    PlotPoint,
    front_line,
    quant_rows,
    sada_phases,
    solver_rows,
)
from difftune.store import TRIAL_KINDS, MetricSpec

__all__ = ["front_figure", "hypervolume_figure", "mask_figure", "quant_figure", "sada_figure", "solver_figure"]

_FAINT = 0.25
_RECOMPUTE, _REUSE = "#1f4e79", "#f2c14e"
_ORDER_COLOURS = {1: "#4c78a8", 2: "#f58518", 3: "#54a24b"}


def _axis_title(spec: MetricSpec) -> str:
    arrow = "↑ better" if spec.direction == "maximize" else "↓ better"
    return f"{spec.name}{f' ({spec.unit})' if spec.unit else ''} — {arrow}"


def _layout(fig: go.Figure, height: int, **kwargs: Any) -> go.Figure:
    fig.update_layout(height=height, margin={"l": 10, "r": 10, "t": 40, "b": 10}, **kwargs)
    return fig


def front_figure(
    points: Sequence[PlotPoint], x: MetricSpec, y: MetricSpec, *, pick: int | None = None, title: str = ""
) -> go.Figure:
    """The study's trials on ``x`` (speedup or latency) against ``y``: one colour and symbol per kind, front points
    solid and outlined, dominated, infeasible and failed ones faint, the 2-D front of these axes as a step line,
    and the ``--select`` pick as a star. Each point's ``customdata`` is its trial number (clicks open it)."""
    fig = go.Figure()
    line = front_line(points, x, y)
    if len(line) > 1:
        fig.add_trace(
            go.Scatter(
                x=[p.x for p in line],
                y=[p.y for p in line],
                mode="lines",
                # the staircase turns at the corner both neighbours beat: up the y axis first when x grows better
                line={"color": "#888", "dash": "dot", "shape": "vh" if x.direction == "maximize" else "hv"},
                name="front of these two axes",
                hoverinfo="skip",
            )
        )
    for kind in TRIAL_KINDS:
        symbol, colour = KIND_STYLE[kind]
        for solid in (True, False):
            group = [p for p in points if p.kind == kind and (p.status == "front") == solid and p.status != "failed"]
            if not group:
                continue
            fig.add_trace(
                go.Scatter(
                    x=[p.x for p in group],
                    y=[p.y for p in group],
                    mode="markers",
                    name=kind if solid else f"{kind} (dominated)",
                    legendgroup=kind,
                    marker={
                        "symbol": symbol,
                        "color": colour,
                        "size": 12 if solid else 9,
                        "opacity": 1.0 if solid else _FAINT,
                        "line": {"width": 1.5 if solid else 0, "color": "#222"},
                    },
                    customdata=[[p.number] for p in group],
                    text=[p.hover for p in group],
                    hovertemplate="%{text}<extra></extra>",
                )
            )
    failed = [p for p in points if p.status == "failed"]
    if failed:
        fig.add_trace(
            go.Scatter(
                x=[p.x for p in failed],
                y=[p.y for p in failed],
                mode="markers",
                name="failed",
                marker={"symbol": "x", "color": "#999", "size": 9, "opacity": _FAINT * 2},
                customdata=[[p.number] for p in failed],
                text=[p.hover for p in failed],
                hovertemplate="%{text}<extra></extra>",
            )
        )
    chosen = [p for p in points if p.number == pick]
    if chosen:
        fig.add_trace(
            go.Scatter(
                x=[chosen[0].x],
                y=[chosen[0].y],
                mode="markers",
                name=f"--select pick (trial {pick})",
                marker={
                    "symbol": "star",
                    "size": 22,
                    "color": "rgba(0,0,0,0)",
                    "line": {"width": 2, "color": "#d62728"},
                },
                customdata=[[chosen[0].number]],
                text=[chosen[0].hover],
                hovertemplate="%{text}<extra></extra>",
            )
        )
    fig.update_xaxes(title=_axis_title(x))
    fig.update_yaxes(title=_axis_title(y))
    return _layout(fig, 520, title=title, legend={"orientation": "h", "y": -0.18}, hovermode="closest")


def mask_figure(components: Sequence[str], mask: Sequence[Sequence[Sequence[int]]]) -> go.Figure:
    """The cache mask as one steps × blocks heatmap per component: dark = recomputed, light = reused from the cache."""
    steps = len(mask)
    blocks = len(mask[0]) if steps else 0
    fig = make_subplots(
        rows=1,
        cols=max(len(components), 1),
        shared_yaxes=True,
        subplot_titles=[
            f"{name}: {sum(1 - mask[s][b][c] for s in range(steps) for b in range(blocks))} of {steps * blocks} reused"
            for c, name in enumerate(components)
        ],
        horizontal_spacing=0.04,
    )
    for c, _name in enumerate(components):
        z = [[mask[s][b][c] for s in range(steps)] for b in range(blocks)]
        fig.add_trace(
            go.Heatmap(
                z=z,
                x=list(range(steps)),
                y=list(range(blocks)),
                zmin=0,
                zmax=1,
                colorscale=[[0.0, _REUSE], [0.5, _REUSE], [0.5, _RECOMPUTE], [1.0, _RECOMPUTE]],
                showscale=c == len(components) - 1,
                colorbar={"tickvals": [0.25, 0.75], "ticktext": ["reuse", "recompute"], "len": 0.8},
                xgap=1,
                ygap=1,
                hovertemplate="step %{x}, block %{y}: %{customdata}<extra></extra>",
                customdata=[["recompute" if v else "reuse" for v in row] for row in z],
            ),
            row=1,
            col=c + 1,
        )
        fig.update_xaxes(title="step", row=1, col=c + 1)
    fig.update_yaxes(title="block (execution order)", autorange="reversed", row=1, col=1)
    return _layout(fig, 120 + 22 * max(blocks, 4))


def solver_figure(solver: Mapping[str, Any]) -> go.Figure:
    """The solver schedule as a timeline: the timestep of each model evaluation, coloured by the solver order,
    shaped by the prediction type (circle: data, triangle: noise), ringed where the UniC corrector runs; the DC
    ratios below (1 = no compensation)."""
    rows = solver_rows(solver)
    fig = make_subplots(
        rows=2, cols=1, shared_xaxes=True, row_heights=[0.7, 0.3], vertical_spacing=0.06, subplot_titles=["", ""]
    )
    fig.add_trace(
        go.Scatter(
            x=[r["step"] for r in rows],
            y=[r["timestep"] for r in rows],
            mode="lines",
            line={"color": "#bbb"},
            showlegend=False,
            hoverinfo="skip",
        ),
        row=1,
        col=1,
    )
    for order in sorted({r["order"] for r in rows}):
        group = [r for r in rows if r["order"] == order]
        fig.add_trace(
            go.Scatter(
                x=[r["step"] for r in group],
                y=[r["timestep"] for r in group],
                mode="markers+text",
                name=f"order {order}",
                text=["C" if r["corrector"] else "" for r in group],
                textposition="top center",
                marker={
                    "size": 14,
                    "color": _ORDER_COLOURS.get(order, "#777"),
                    "symbol": ["circle" if r["prediction"] == "data" else "triangle-up" for r in group],
                    "line": {"width": [3 if r["corrector"] else 0 for r in group], "color": "#d62728"},
                },
                customdata=[[r["prediction"], "yes" if r["corrector"] else "no", r["dc_ratio"]] for r in group],
                hovertemplate=(
                    "step %{x}: t=%{y:.1f}<br>order " + str(order) + ", %{customdata[0]} prediction<br>"
                    "corrector: %{customdata[1]}<br>DC ratio %{customdata[2]:.4g}<extra></extra>"
                ),
            ),
            row=1,
            col=1,
        )
    fig.add_trace(
        go.Bar(
            x=[r["step"] for r in rows],
            y=[r["dc_ratio"] - 1.0 for r in rows],
            base=1.0,
            name="DC ratio",
            marker={"color": "#72b7b2"},
            hovertemplate="step %{x}: DC ratio %{y:.4g}<extra></extra>",
        ),
        row=2,
        col=1,
    )
    fig.update_yaxes(title="timestep", row=1, col=1)
    fig.update_yaxes(title="DC ratio", row=2, col=1)
    fig.update_xaxes(title="model evaluation", dtick=1, row=2, col=1)
    return _layout(fig, 420, legend={"orientation": "h", "y": 1.08})


def sada_figure(sparsity: Mapping[str, Any], steps: int) -> go.Figure:
    """SADA's windows over the steps: where the next step may be skipped by the stability criterion, where on the
    Lagrange schedule, and where it is always computed."""
    phases = sada_phases(sparsity, steps)
    names = {"computed": 0, "momentum": 1, "lagrange": 2}
    fig = go.Figure(
        go.Heatmap(
            z=[[names[p] for p in phases]],
            x=list(range(steps)),
            y=["after step"],
            zmin=0,
            zmax=2,
            colorscale=[
                [0.0, "#d9d9d9"],
                [0.33, "#d9d9d9"],
                [0.33, "#9ecae1"],
                [0.66, "#9ecae1"],
                [0.66, "#fd8d3c"],
                [1.0, "#fd8d3c"],
            ],
            colorbar={"tickvals": [0.33, 1.0, 1.67], "ticktext": ["computed", "momentum", "Lagrange"], "len": 1.2},
            xgap=1,
            customdata=[phases],
            hovertemplate="after step %{x}: %{customdata}<extra></extra>",
        )
    )
    fig.update_xaxes(title="step")
    return _layout(fig, 170)


def quant_figure(quant: Mapping[str, Any]) -> go.Figure:
    """Weight and activation bit-widths per layer (the default first)."""
    rows = quant_rows(quant)
    labels = [str(r["layer"]) for r in rows]
    fig = go.Figure(
        [
            go.Bar(y=labels, x=[r["weight_bits"] for r in rows], name="weight bits", orientation="h"),
            go.Bar(y=labels, x=[r["activation_bits"] for r in rows], name="activation bits", orientation="h"),
        ]
    )
    fig.update_xaxes(title="bits", tickvals=[4, 8, 16])
    fig.update_yaxes(autorange="reversed")
    return _layout(
        fig, 140 + 28 * len(rows), barmode="group", legend={"orientation": "h", "y": 1.02, "yanchor": "bottom"}
    )


def hypervolume_figure(history: Sequence[HypervolumePoint], handmade: float | None = None) -> go.Figure:
    """The front's hypervolume against the trial number; the trials that raised it are marked by kind."""
    fig = go.Figure(
        go.Scatter(
            x=[p.number for p in history],
            y=[p.hypervolume for p in history],
            mode="lines",
            line={"shape": "hv", "color": "#444"},
            name="hypervolume",
            hovertemplate="after trial %{x}: %{y:.4g}<extra></extra>",
        )
    )
    for kind in TRIAL_KINDS:
        raised = [p for p in history if p.improved and p.kind == kind]
        if raised:
            symbol, colour = KIND_STYLE[kind]
            fig.add_trace(
                go.Scatter(
                    x=[p.number for p in raised],
                    y=[p.hypervolume for p in raised],
                    mode="markers",
                    name=f"raised by a {kind} trial",
                    marker={"symbol": symbol, "color": colour, "size": 9},
                    hovertemplate="trial %{x} (" + kind + "): %{y:.4g}<extra></extra>",
                )
            )
    if handmade is not None and history:
        fig.add_hline(
            y=handmade,
            line={"dash": "dash", "color": KIND_STYLE["baseline"][1]},
            annotation_text="hand-made points only (baselines and seeds)",
            annotation_position="bottom right",
        )
    fig.update_xaxes(title="trial number")
    fig.update_yaxes(title="hypervolume of the front")
    return _layout(fig, 420, legend={"orientation": "h", "y": -0.2})
