"""The examples in the store's docstrings run and print what they say."""

from __future__ import annotations

import doctest
import importlib

import pytest

import difftune.store


@pytest.mark.parametrize("module", ["_records", "_pareto", "_select", "_storage", "_migrate"])
def test_docstring_examples(module: str) -> None:
    result = doctest.testmod(importlib.import_module(f"difftune.store.{module}"), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0


def test_public_names_are_documented() -> None:
    for name in difftune.store.__all__:
        value = getattr(difftune.store, name)
        if callable(value) and not isinstance(value, type(difftune.store.Direction)):
            assert value.__doc__, f"difftune.store.{name} has no docstring"
