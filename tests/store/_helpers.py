"""Helpers shared by the store tests (importable by worker processes: no pytest, no torch use)."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

from difftune.store import Store, StudyRecord, TrialRecord


def png_bytes(value: int = 0, size: int = 4) -> bytes:
    """A tiny grey PNG."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("L", (size, size), color=value).save(buffer, format="PNG")
    return buffer.getvalue()


def make_study(
    store: Store, name: str = "demo", objectives: Sequence[object] = ("speedup", "psnr"), fingerprint: str = "fp-1"
) -> StudyRecord:
    model = store.create_model("embedded", "embedded", fingerprint)
    return store.create_study(name, model_id=model.id, space="cache", searcher="nsga2", objectives=objectives)  # type: ignore[arg-type]


def complete(store: Store, study: int | str, metrics: Mapping[str, float], **params: object) -> TrialRecord:
    """Add a trial and complete it with ``metrics`` (known metric names)."""
    trial = store.add_trial(study, dict(params))
    return store.set_trial_state(trial.id, "complete", metrics=metrics)


def write_trials(url: str, study: str, worker: int, n: int) -> list[int]:
    """One worker process: ``n`` trials with automatic numbers, each completed with metrics."""
    store = Store(url)
    try:
        ids = []
        for i in range(n):
            trial = store.add_trial(study, {"worker": worker, "i": i}, worker_id=f"w{worker}")
            store.set_trial_state(trial.id, "complete", metrics={"speedup": 1.0 + i, "psnr": 30.0 + worker})
            ids.append(trial.id)
        return ids
    finally:
        store.close()


def write_same_numbers(url: str, study: str, worker: int, numbers: Sequence[int]) -> list[int]:
    """One worker process inserting trials whose numbers every other worker inserts too (a retried insert)."""
    store = Store(url)
    try:
        return [store.add_trial(study, {"shared": n}, number=n, worker_id=f"w{worker}").id for n in numbers]
    finally:
        store.close()
