"""The spaces registry, the Variable encodings, and the import weight of difftune.spaces."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from difftune.errors import SpaceError
from difftune.spaces import Space, Variable, get_space, register_space, spaces


def test_known_spaces_and_unknown_name_error():
    assert {"solver", "cache"} <= set(spaces())
    with pytest.raises(SpaceError, match=r"unknown space 'nope'; known spaces: .*cache.*solver"):
        get_space("nope")


def test_register_space_refuses_a_second_class_under_a_taken_name():
    class Other(Space):
        def variables(self, context):
            return []

        def _decode(self, params, context):
            return {}

    with pytest.raises(SpaceError, match="already registered"):
        register_space("solver")(Other)


def test_importing_spaces_leaves_optuna_and_pymoo_out():
    code = (
        "import sys, difftune.spaces as s\n"
        "s.get_space('solver'); s.get_space('cache')\n"
        "print(' '.join(m for m in ('optuna', 'pymoo') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


@pytest.mark.parametrize(
    "variable",
    [
        Variable("i", "int", 1, 10),
        Variable("j", "int", 0, 12, step=3),
        Variable("f", "float", 0.5, 2.0, log=True, default=1.0),
        Variable("c", "categorical", choices=("a", "b", 3)),
        Variable("b", "bool"),
    ],
)
def test_variable_encodings_agree(variable):
    from optuna.distributions import distribution_to_json, json_to_distribution

    dist = variable.to_optuna_distribution()
    assert json_to_distribution(distribution_to_json(dist)) == dist
    rng = np.random.default_rng(0)
    for _ in range(30):
        value = variable.sample(rng)
        assert variable.contains(value)
        assert dist._contains(dist.to_internal_repr(value))
        assert variable.from_number(variable.to_number(value)) == value
    low, high = variable.bounds
    assert variable.contains(variable.from_number(low - 5)) and variable.contains(variable.from_number(high + 5))


def test_bad_variables_are_refused():
    with pytest.raises(SpaceError, match="low <= high"):
        Variable("x", "int", 5, 1)
    with pytest.raises(SpaceError, match="log-scale"):
        Variable("x", "float", 0.0, 1.0, log=True)
    with pytest.raises(SpaceError, match="choices"):
        Variable("x", "categorical")
    assert Variable("b", "bool").contains(True) and not Variable("c", "categorical", choices=(1, 2)).contains(True)


def test_clamp_snaps_to_the_grid_and_range():
    v = Variable("j", "int", 0, 12, step=3)
    assert [v.clamp(x) for x in (-4, 4, 5.1, 99, "x")] == [0, 3, 6, 12, 0]
    assert Variable("c", "categorical", choices=("a", "b")).clamp("z") == "a"
