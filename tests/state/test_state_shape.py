"""Tier 2: the shape of ParallelState, checked without torch.distributed.

Behaviours:
* a state never has ``initialize_sequence_parallel`` (DeepSpeed would take it for
  its SP-only module and use WORLD as the data-parallel group);
* the keyword form's signature lists every axis of the table, once;
* every size keyword of the table reaches the layout, and the layout reports it.
"""

from __future__ import annotations

import inspect

import pytest

from scoped_parallel import ParallelLayout, ParallelState
from scoped_parallel.layout.axes import AXES


def test_state_is_never_mistaken_for_deepspeeds_sequence_parallel_module():
    assert not hasattr(ParallelState, "initialize_sequence_parallel"), (
        "ParallelState grew initialize_sequence_parallel: DeepSpeed would treat it as "
        "parallel_state_sp and all-reduce gradients over WORLD"
    )


def test_keyword_signature_lists_each_axis_once():
    params = list(inspect.signature(ParallelState).parameters)
    for axis in AXES:
        assert params.count(axis.keyword) == 1, f"{axis.keyword} appears {params.count(axis.keyword)}x in {params}"
    layout_params = list(inspect.signature(ParallelLayout).parameters)
    assert [p for p in layout_params if p.endswith("_size") and p != "world_size"] == [a.keyword for a in AXES]


@pytest.mark.parametrize("axis", AXES, ids=lambda a: a.token)
def test_every_axis_keyword_reaches_the_layout(axis):
    layout = ParallelLayout(4, order="tp-cp-ep-dp-pp", **{axis.keyword: 2})
    got = getattr(layout, axis.keyword)
    assert got == 2, f"ParallelLayout(4, {axis.keyword}=2).{axis.keyword} is {got}, expected 2"
    assert layout.to_dict()[axis.keyword] == 2
    assert layout.sizes()[axis.token] == 2


def test_unknown_size_keyword_is_refused_with_the_valid_names():
    with pytest.raises(TypeError, match="unknown size keyword.*tensor_model_parallel_size"):
        ParallelLayout(4, tensor_parallel_size=2)
