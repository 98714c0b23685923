"""The Streamlit pages of ``difftune dashboard``; :data:`difftune.dashboard.APP_FILE` runs :func:`main`.

Every rerun (a click, the Refresh button, the browser's reload, the auto-refresh of a running study)
reads the store afresh, so a running study's new trials appear. Navigation state lives in the URL's
query parameters (``?study=NAME&page=Point&trial=12``), so a view can be shared or reloaded.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from typing import Any

import streamlit as st

from difftune.dashboard import _charts, _data
from difftune.errors import DifftuneError
from difftune.store import (
    HELD_OUT,
    TRIAL_KINDS,
    Store,
    StudyRecord,
    StudyStatus,
    TrialRecord,
    TrialState,
    database_exists,
    default_url,
    get_store,
    mask_url,
    parse_select,
    rank_points,
)

__all__ = ["PAGES", "main"]

#: The pages, in the sidebar's order.
PAGES = ("Studies", "Front", "Point", "Compare", "Hypervolume")
#: Seconds between reruns while "auto-refresh" is on.
REFRESH_S = 5
_THUMB_PX = 96
#: The kinds' marker shapes (the chart's symbols) in the filter's labels.
_KIND_MARK = {"baseline": "■", "seed": "◆", "searched": "●", "retry": "◉", "warm": "▲"}


def main() -> None:
    """Render the page the session's state (or the URL) asks for."""
    st.set_page_config(page_title="difftune dashboard", layout="wide")
    st.session_state["_full_run"] = True
    url = default_url()
    with st.sidebar:
        st.title("difftune")
        st.caption(f"storage: `{mask_url(url)}`")
    if not database_exists(url):
        _first_run(url, missing=True)
        return
    try:
        # Opened per run, not cached: a database file replaced while the server runs (rm, a new calibrate) is
        # read anew instead of through connections to the old one.
        with get_store(url) as store:
            studies = store.list_studies()
            if not studies:
                _first_run(url, missing=False)
                return
            _render(store, studies)
    except DifftuneError as exc:  # an unreadable database, a study that vanished: one line, never a traceback
        st.error(f"error: {_one_line(exc)}")


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _first_run(url: str, *, missing: bool) -> None:
    """The page of a database without studies: how to make the first one."""
    masked = mask_url(url)
    st.title("difftune dashboard")
    if missing:
        st.info(f"There is no database at `{masked}` yet.")
    else:
        st.info(f"The database at `{masked}` holds no studies yet.")
    storage = "" if url == "sqlite:///difftune.db" else f" --storage '{masked}'"
    st.markdown(
        "Run a first calibration: it tunes the embedded model's cache schedule (24 trials, a few minutes on a "
        "laptop CPU) and stores its Pareto front here."
    )
    st.code(f"difftune calibrate{storage}", language="bash")
    st.markdown(
        "Then reload this page: the study's front appears, and its trials show up while it runs. "
        "Your own model: `difftune calibrate --model PATH_OR_HUB_ID --device cuda` (see the README)."
    )


# -- navigation ----------------------------------------------------------------------------------------


def _init_from_url() -> None:
    """Once per session: take the study, page and trial from the URL's query parameters."""
    if st.session_state.get("_from_url"):
        return
    st.session_state["_from_url"] = True
    params = st.query_params
    if "study" in params:
        st.session_state["study"] = params["study"]
    if params.get("page") in PAGES:
        st.session_state["page"] = params["page"]
    trial = params.get("trial", "")
    if trial.isdigit():
        st.session_state["trial"] = int(trial)


def _go(page: str, trial: int | None = None, study: str | None = None) -> None:
    """Switch page (from a callback: widgets' state may change only there or before they are drawn)."""
    st.session_state["page"] = page
    if trial is not None:
        st.session_state["trial"] = trial
    if study is not None:
        st.session_state["study"] = study


def _on_chart_click(key: str) -> None:
    points = (st.session_state.get(key) or {}).get("selection", {}).get("points") or []
    if points:
        data = points[0].get("customdata")
        number = data[0] if isinstance(data, list) else data
        if number is not None:
            _go("Point", trial=int(number))


def _on_row_click(key: str, values: Sequence[Any], page: str, field: str) -> None:
    rows = (st.session_state.get(key) or {}).get("selection", {}).get("rows") or []
    if rows and rows[0] < len(values):
        _go(page, **{field: values[rows[0]]})


@st.fragment(run_every=REFRESH_S)
def _auto_refresh() -> None:
    # Run with the page, the fragment does nothing; run alone by its timer, it reruns the whole app.
    if st.session_state.pop("_full_run", False):
        return
    st.rerun()


def _render(store: Store, studies: list[StudyRecord]) -> None:
    _init_from_url()
    models = {m.id: m for m in store.list_models()}
    newest_first = sorted(studies, key=lambda s: (s.created_at, s.id), reverse=True)
    with st.sidebar:
        model_ids = [None, *sorted({s.model_id for s in studies})]
        model_id = st.selectbox(
            "Model",
            model_ids,
            format_func=lambda i: "every model" if i is None else _model_name(models, i),
            key="model",
        )
        shown = [s for s in newest_first if model_id is None or s.model_id == model_id]
        names = [s.name for s in shown]
        if st.session_state.get("study") not in names:
            st.session_state["study"] = names[0]
        name = st.selectbox("Study", names, key="study")
        if st.session_state.get("page") not in PAGES:
            st.session_state["page"] = "Front"
        page = st.radio("Page", PAGES, key="page")
        study = next(s for s in shown if s.name == name)
    trials = store.list_trials(study.id)
    with st.sidebar:
        if study.status is StudyStatus.RUNNING:
            finished = store.count_budget_trials(study.id)
            budget = f" of {study.budget}" if study.budget else ""
            st.info(f"{study.name} is running: {finished}{budget} trials finished. Refresh to see new ones.")
        st.button("Refresh", help="Read the database again (a running study's new trials appear).")
        if study.status is StudyStatus.RUNNING and st.toggle(f"Auto-refresh every {REFRESH_S} s", key="auto"):
            _auto_refresh()
    try:
        front = store.pareto_front(study.id, constraints=_data.study_constraints(study))
    except DifftuneError as exc:  # e.g. no trial measured an objective yet: the pages still show the trials
        st.warning(f"no front yet: {_one_line(exc)}")
        front = []
    params = {"study": study.name, "page": page}
    if page == "Studies":
        _studies_page(store, studies, models)
    elif page == "Front":
        _front_page(store, study, trials, front)
    elif page == "Point":
        trial = _point_page(store, study, trials, front)
        if trial is not None:
            params["trial"] = str(trial.number)
    elif page == "Compare":
        _compare_page(store, study, trials, front)
    else:
        _hypervolume_page(study, trials, front)
    st.query_params.from_dict(params)


def _model_name(models: dict[int, Any], model_id: int) -> str:
    model = models.get(model_id)
    return f"model {model_id}" if model is None else f"{model.name.rstrip('/').split('/')[-1]} ({model.family})"


# -- pages -----------------------------------------------------------------------------------------------


def _studies_page(store: Store, studies: list[StudyRecord], models: dict[int, Any]) -> None:
    st.title("Models and studies")
    st.caption("Click a study's row to open its Pareto front.")
    for model_id in sorted({s.model_id for s in studies}):
        model = models.get(model_id)
        own = [s for s in studies if s.model_id == model_id]
        st.subheader(_model_name(models, model_id))
        if model is not None:
            st.caption(f"`{model.name}` · weights {model.fingerprint[:19]}… · {len(own)} studies")
        rows = [_data.study_row(store, s) for s in own]
        key = f"studies-{model_id}"
        st.dataframe(
            rows,
            hide_index=True,
            key=key,
            on_select=functools.partial(_on_row_click, key, [s.name for s in own], "Front", "study"),
            selection_mode="single-row",
        )


def _study_header(study: StudyRecord, trials: Sequence[TrialRecord], front: Sequence[TrialRecord]) -> None:
    st.title(study.name)
    settings = study.reference or {}
    counts = {state: sum(1 for t in trials if t.state is state) for state in TrialState}
    bits = [
        f"{study.space} space",
        study.searcher,
        " ".join(str(v) for v in (settings.get("device") or "cpu", settings.get("dtype") or "") if v),
        f"{settings.get('num_inference_steps')} reference steps" if settings.get("num_inference_steps") else "",
        f"{counts[TrialState.COMPLETE]} complete",
        f"{counts[TrialState.FAILED]} failed" if counts[TrialState.FAILED] else "",
        f"{counts[TrialState.INTERRUPTED]} interrupted" if counts[TrialState.INTERRUPTED] else "",
        f"{counts[TrialState.RUNNING]} running" if counts[TrialState.RUNNING] else "",
        f"{len(front)} on the front",
    ]
    constraints = _data.study_constraints(study)
    if constraints:
        bits.append("bounds: " + " and ".join(constraints))
    st.caption(" · ".join(b for b in bits if b))


def _front_page(store: Store, study: StudyRecord, trials: list[TrialRecord], front: list[TrialRecord]) -> None:
    _study_header(study, trials, front)
    xs, ys = _data.x_metrics(trials), _data.quality_metrics(study, trials)
    if not xs or not ys:
        st.info("No trial has measured a speed and a quality metric yet: nothing to draw. Refresh in a moment.")
        return
    chart_column, controls = st.columns([7, 2])
    with controls:
        x = st.radio("x axis", xs, key=f"x-{study.id}")
        y = st.selectbox("y axis", ys, key=f"y-{study.id}")
        st.markdown("Kinds")
        kinds = [
            kind
            for kind in TRIAL_KINDS
            if st.checkbox(f"{_KIND_MARK[kind]} {kind}", value=True, key=f"kind-{kind}-{study.id}")
        ]
        show_dominated = st.checkbox("Dominated points (faint)", value=True, key=f"dom-{study.id}")
        show_failed = st.checkbox("Failed points (faint)", value=True, key=f"failed-{study.id}")
    select = chart_column.text_input(
        "Filter and pick, in the `--select` grammar",
        key=f"select-{study.id}",
        placeholder=_data.default_select(study, front),
        help="GOAL [where METRIC>=VALUE [and …]], e.g. 'fastest where psnr>=30' or 'best psnr where speedup>=2': "
        "points missing a bound are hidden, and the point `difftune export --select` would re-measure first is "
        "starred.",
    ).strip()
    pick, bounds = None, None
    if select:
        try:
            parse_select(select)
            bounds = select  # a well-formed filter hides the points that miss its bounds, even when none meets them
            pick = rank_points(front, select)[0]
            values = pick.values()
            shown = ", ".join(_data.fmt(values.get(o.name), o.unit) + f" {o.name}" for o in study.objectives)
            chart_column.success(f"`{select}` picks {_data.point_title(pick)}: {shown}")
        except DifftuneError as exc:
            chart_column.warning(_one_line(exc))
    points = _data.plot_points(
        trials,
        [t.id for t in front],
        x,
        y,
        constraints=_data.study_constraints(study),
        select=bounds,
        kinds=kinds,
        show_dominated=show_dominated,
        show_failed=show_failed,
    )
    x_spec, y_spec = _data.metric_of(x, trials), _data.metric_of(y, trials)
    on_front = sum(1 for p in points if p.status == "front")
    chart_column.caption(
        f"{len(points)} points drawn, {on_front} on the study's front (solid, outlined). Click a point for its "
        "schedule and images."
    )
    key = f"front-chart-{study.id}"
    chart_column.plotly_chart(
        _charts.front_figure(points, x_spec, y_spec, pick=None if pick is None else pick.number),
        key=key,
        on_select=functools.partial(_on_chart_click, key),
        selection_mode="points",
    )
    st.subheader(f"Pareto front: {len(front)} points")
    rows = _front_rows(study, front)
    table_key = f"front-table-{study.id}"
    st.dataframe(
        rows,
        hide_index=True,
        key=table_key,
        on_select=functools.partial(_on_row_click, table_key, [t.number for t in front], "Point", "trial"),
        selection_mode="single-row",
    )
    failed = [t for t in trials if t.state in (TrialState.FAILED, TrialState.INTERRUPTED, TrialState.PRUNED)]
    if failed:
        with st.expander(f"{len(failed)} trials did not complete"):
            st.dataframe(
                [{"trial": t.number, "kind": t.kind, "state": t.state.value, "reason": t.error} for t in failed],
                hide_index=True,
            )
    with st.expander("Export a profile", expanded=bool(select)):
        _export_panel(store, study, select or _data.default_select(study, front), f"front-{study.id}")


def _front_rows(study: StudyRecord, front: Sequence[TrialRecord]) -> list[dict[str, Any]]:
    names = [o.name for o in study.objectives]
    extra = [n for n in ("latency_ms", "nfe") if n not in names]
    rows = []
    for t in front:
        values = t.values()
        row: dict[str, Any] = {"trial": t.number, "kind": t.kind, "method": _data.point_label(t)}
        for o in study.objectives:
            row[f"{o.name} {'↑' if o.direction == 'maximize' else '↓'}"] = values.get(o.name)
        for n in extra:
            row[n] = values.get(n)
        row["settings"] = "; ".join(_data.section_summaries(_data.profile_of(t)))
        rows.append(row)
    return rows


def _choose_point(
    label: str, key: str, trials: Sequence[TrialRecord], front_ids: set[int], default: int | None
) -> TrialRecord | None:
    by_number = {t.number: t for t in trials}
    if not by_number:
        return None
    if st.session_state.get(key) not in by_number:
        st.session_state[key] = default if default in by_number else max(by_number)
    number = st.selectbox(
        label,
        list(by_number),
        key=key,
        format_func=lambda n: (
            _data.point_title(by_number[n])
            + (" · on the front" if by_number[n].id in front_ids else f" · {by_number[n].state.value}")
        ),
    )
    return by_number.get(number)


def _point_page(
    store: Store, study: StudyRecord, trials: list[TrialRecord], front: list[TrialRecord]
) -> TrialRecord | None:
    front_ids = {t.id for t in front}
    _study_header(study, trials, front)
    trial = _choose_point("Point", "trial", trials, front_ids, front[0].number if front else None)
    if trial is None:
        st.info("This study has no trials yet.")
        return None
    st.header(_data.point_title(trial))
    where = "on the Pareto front" if trial.id in front_ids else "not on the front"
    st.markdown(f"**{trial.state.value}** · {where}" + (f" · error: `{trial.error}`" if trial.error else ""))
    values = trial.values()
    tiles = [o for o in study.objectives if o.name in values]
    tiles += [
        _data.metric_of(n, [trial]) for n in ("latency_ms", "nfe") if n in values and n not in {o.name for o in tiles}
    ]
    if tiles:
        for column, spec in zip(st.columns(len(tiles)), tiles, strict=True):
            held = trial.value(spec.name, HELD_OUT)
            column.metric(
                spec.name,
                _data.fmt(values[spec.name], spec.unit),
                delta=None if held is None else f"held-out {_data.fmt(held, spec.unit)}",
                delta_color="off",
            )
    _images(store, study, trial)
    _schedule(_data.profile_of(trial))
    st.subheader("Metrics")
    if trial.values(HELD_OUT):
        st.caption("Held-out figures were measured by an export on samples the search never saw.")
    else:
        st.caption("No held-out figures yet: exporting this point re-measures it on held-out samples.")
    st.dataframe(_data.metric_rows(trial, study.objectives), hide_index=True)
    with st.expander("Profile JSON and search parameters"):
        st.json({"profile": _data.profile_of(trial), "params": trial.params}, expanded=False)
    if trial.id in front_ids:
        with st.expander("Export this point"):
            expr = _data.select_expression_for(trial, front, study.objectives)
            _export_panel(store, study, expr or _data.default_select(study, front), f"point-{study.id}")
    else:
        st.caption("Not on the front: `difftune export` picks front points only.")
    return trial


def _images(store: Store, study: StudyRecord, trial: TrialRecord) -> None:
    images = store.get_images(trial.id)
    reference = {r.index: r for r in store.get_reference_images(study.id)}
    st.subheader("Images")
    if not images:
        st.caption(
            "No thumbnails stored for this trial (it did not complete, ran before difftune stored thumbnails, or the "
            "study's thumbnail budget was used up)."
        )
        return
    own, ref = st.columns(2)
    own.markdown("**This point**")
    own.image(
        [_data.enlarge(i.png, _THUMB_PX) for i in images],
        caption=[f"sample {i.index}" for i in images],
        width=_THUMB_PX,
        output_format="PNG",
    )
    ref.markdown("**Reference setting**, same samples (what PSNR compares with)")
    shown = [reference[i.index] for i in images if i.index in reference]
    if shown:
        ref.image(
            [_data.enlarge(r.png, _THUMB_PX) for r in shown],
            caption=[f"sample {r.index}" for r in shown],
            width=_THUMB_PX,
            output_format="PNG",
        )
    else:
        ref.caption("No reference thumbnails stored for this study.")


def _schedule(profile: dict[str, Any] | None) -> None:
    st.subheader("Schedule")
    if profile is None:
        st.caption("No profile stored with this trial.")
        return
    steps = int((profile.get("context") or {}).get("num_inference_steps") or 0)
    for line in _data.section_summaries(profile):
        st.markdown(f"- {line}")
    solver = profile.get("solver")
    if isinstance(solver, dict):
        st.markdown("**Solver schedule**: one marker per model evaluation (C: UniC corrector)")
        st.plotly_chart(_charts.solver_figure(solver), key="solver-chart")
        st.dataframe(_data.solver_rows(solver), hide_index=True)
    cache = profile.get("cache")
    grid = _data.mask_of(cache)
    if grid is not None:
        st.markdown("**Cache mask**: steps × blocks, per component")
        st.plotly_chart(_charts.mask_figure(*grid), key="mask-chart")
    elif isinstance(cache, dict):
        st.markdown(f"**Cache policy** `{cache.get('policy')}`: decided while the pipeline runs")
        st.dataframe([{"setting": k, "value": json.dumps(v)} for k, v in cache.items()], hide_index=True)
    sparsity = profile.get("sparsity")
    if isinstance(sparsity, dict):
        st.markdown("**SADA**: which rule applies after each step (skips are decided while the pipeline runs)")
        if steps:
            st.plotly_chart(_charts.sada_figure(sparsity, steps), key="sada-chart")
        st.dataframe(_data.sada_rows(sparsity), hide_index=True)
    quant = profile.get("quantization")
    if isinstance(quant, dict):
        st.markdown(f"**Quantization** ({quant.get('backend', 'simulated')} backend): bits per layer")
        st.plotly_chart(_charts.quant_figure(quant), key="quant-chart")
        st.dataframe(_data.quant_rows(quant), hide_index=True)


def _compare_page(store: Store, study: StudyRecord, trials: list[TrialRecord], front: list[TrialRecord]) -> None:
    _study_header(study, trials, front)
    complete = [t for t in trials if t.state is TrialState.COMPLETE]
    if not complete:
        st.info("No complete trials to compare yet.")
        return
    front_ids = {t.id for t in front}
    ordered = [*front, *(t for t in complete if t.id not in front_ids)]
    first = ordered[0].number
    second = ordered[1].number if len(ordered) > 1 else first
    left, right = st.columns(2)
    with left:
        a = _choose_point("Point A", "compare_a", complete, front_ids, first)
    with right:
        b = _choose_point("Point B", "compare_b", complete, front_ids, second)
    if a is None or b is None:
        return
    reference = {r.index: r for r in store.get_reference_images(study.id)}
    for column, trial in ((left, a), (right, b)):
        with column:
            st.subheader(_data.point_title(trial))
            for line in _data.section_summaries(_data.profile_of(trial)):
                st.markdown(f"- {line}")
            images = store.get_images(trial.id)
            if images:
                st.image(
                    [_data.enlarge(i.png, _THUMB_PX) for i in images],
                    caption=[f"sample {i.index}" for i in images],
                    width=_THUMB_PX,
                    output_format="PNG",
                )
    shown = [reference[i] for i in sorted(reference)]
    if shown:
        st.caption("The reference setting on the same samples:")
        st.image(
            [_data.enlarge(r.png, _THUMB_PX) for r in shown],
            caption=[f"reference {r.index}" for r in shown],
            width=_THUMB_PX,
            output_format="PNG",
        )
    st.subheader("Metrics (calibration samples)")
    va, vb = a.values(), b.values()
    names = [o.name for o in study.objectives if o.name in va or o.name in vb]
    names += sorted(n for n in {*va, *vb} if n not in names)
    rows = []
    for name in names:
        spec = _data.metric_of(name, [a, b])
        rows.append(
            {
                "metric": name,
                "unit": spec.unit,
                "better": "↑" if spec.direction == "maximize" else "↓",
                f"A: trial {a.number}": va.get(name),
                f"B: trial {b.number}": vb.get(name),
                "B − A": None if name not in va or name not in vb else vb[name] - va[name],
            }
        )
    st.dataframe(rows, hide_index=True)


def _hypervolume_page(study: StudyRecord, trials: list[TrialRecord], front: list[TrialRecord]) -> None:
    from difftune.search.runner import hypervolume_reference

    st.title(f"{study.name}: hypervolume")
    history = _data.hypervolume_history(study, trials)
    if not history:
        st.info("No complete trial has every objective yet.")
        return
    handmade = _data.handmade_hypervolume(study, trials)
    reference = hypervolume_reference(list(study.objectives), [t.values() for t in front])  # as the runner takes it
    where = ", ".join(f"{o.name} {_data.fmt(r, o.unit)}" for o, r in zip(study.objectives, reference, strict=True))
    st.caption(
        f"The volume the front dominates up to the reference point ({where}), after each trial — the figure "
        "`difftune calibrate`'s progress bar shows. The dashed line is the hand-made points' alone."
    )
    st.plotly_chart(_charts.hypervolume_figure(history, handmade), key="hv-chart")
    final = history[-1].hypervolume
    ratio = f" ({final / handmade:.3g}× the hand-made points')" if handmade > 0 else ""
    st.metric("hypervolume now", f"{final:.4g}", delta=None)
    st.caption(f"after trial {history[-1].number}{ratio}")
    st.dataframe(
        [{"trial": p.number, "kind": p.kind, "hypervolume": p.hypervolume} for p in history if p.improved],
        hide_index=True,
    )


# -- export ----------------------------------------------------------------------------------------------


def _export_panel(store: Store, study: StudyRecord, default: str, key: str) -> None:
    from difftune.search.export import FORMATS

    if st.session_state.get(f"{key}-default") != default:  # a new filter or point: start again from it
        st.session_state[f"{key}-default"] = default
        st.session_state[f"{key}-select"] = default
    select = st.text_input("--select", key=f"{key}-select").strip()
    columns = st.columns(2)
    fmt = columns[0].radio("--format", FORMATS, horizontal=True, key=f"{key}-format")
    validate = columns[1].checkbox(
        "Re-measure on held-out samples (off: --no-validate)", value=True, key=f"{key}-validate"
    )
    storage = "" if store.url == "sqlite:///difftune.db" else f" --storage '{store.url}'"
    out = "profile.json" if fmt == "difftune" else "profile/"
    flags = f"{'' if validate else ' --no-validate'}{'' if fmt == 'difftune' else f' --format {fmt}'}"
    st.caption("The same as:")
    st.code(f'difftune export --study {study.name}{storage} --select "{select}" --out {out}{flags}', language="bash")
    if st.button("Export", key=f"{key}-run", type="primary", disabled=not select):
        with st.status("exporting …", expanded=False) as status:
            try:
                exported = _data.export_file(
                    store,
                    study.name,
                    select,
                    format=fmt,
                    validate=validate,
                    progress=lambda text: status.update(label=text),
                )
            except DifftuneError as exc:
                status.update(label="export failed", state="error")
                st.session_state.pop(f"{key}-file", None)
                st.error(f"error: {_one_line(exc)}")
            else:
                status.update(label=f"exported trial {exported.trial}", state="complete")
                st.session_state[f"{key}-file"] = exported
    exported = st.session_state.get(f"{key}-file")
    if isinstance(exported, _data.ExportedFile):
        how = "re-measured on held-out samples" if exported.validated else "calibration figures (not re-measured)"
        skipped = f"; missed it on held-out samples: trials {list(exported.rejected)}" if exported.rejected else ""
        st.success(f"`{exported.select}` → trial {exported.trial}, {how}{skipped}")
        for message in exported.messages:
            st.warning(message)
        st.download_button(
            f"Download {exported.file_name}",
            data=exported.data,
            file_name=exported.file_name,
            mime=exported.mime,
            key=f"{key}-download",
        )
