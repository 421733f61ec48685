"""Tier 1: the worked examples in the pure modules' docstrings run and give what they show."""

from __future__ import annotations

import doctest
import importlib

import pytest

PURE_MODULES = (
    "scoped_parallel.layout",
    "scoped_parallel.layout.kinds",
    "scoped_parallel.layout.checks",
    "scoped_parallel.layout.report",
    "scoped_parallel.resharding.plan",
)


@pytest.mark.parametrize("name", PURE_MODULES)
def test_docstring_examples_pass(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module)
    assert result.attempted > 0, f"{name} has no docstring examples"
    assert result.failed == 0, f"{name}: {result.failed} of {result.attempted} docstring examples failed"
