"""A corpus of bad inputs: each raises a typed error naming the value and the fix, and leaves nothing behind.

Layout and config cases need no process group (tier 1, pure layout math). State cases
run under torch's fake backend as rank 1 of 8 (tier 3): validation must happen before
any communication, so no peer is needed for the error to appear (a hang here would be
a bug). CLI cases exit with status 2 and name the value; adapter cases raise typed errors.
"""

from __future__ import annotations

from typing import Any, Callable

import pytest

from scoped_parallel import (
    GroupNotAvailableError,
    LayoutError,
    NoActiveStateError,
    ParallelLayout,
    ParallelState,
    RankNotInLayoutError,
    ScopedParallelError,
)
from scoped_parallel.layout.cli import main as cli
from scoped_parallel.layout.config import sizes_from_config
from scoped_parallel.errors import DistributedNotInitializedError
from scoped_parallel.testing import fake_world

L = ParallelLayout

# (id, call, expected error type, text the message must contain)
LAYOUT_CASES: list[tuple[str, Callable[[], Any], type, str]] = [
    ("zero-tp", lambda: L(8, tensor_model_parallel_size=0), LayoutError, "0"),
    ("negative-pp", lambda: L(8, pipeline_model_parallel_size=-2), LayoutError, "-2"),
    ("bool-size", lambda: L(8, tensor_model_parallel_size=True), TypeError, "True"),
    ("float-size", lambda: L(8, tensor_model_parallel_size=2.0), TypeError, "2.0"),
    ("str-size", lambda: L(8, context_parallel_size="2"), TypeError, "'2'"),
    ("zero-world", lambda: L(0), LayoutError, "0"),
    ("float-world", lambda: L(8.0), TypeError, "8.0"),
    ("not-divisible", lambda: L(12, tensor_model_parallel_size=8), LayoutError, "12"),
    ("not-divisible-pp", lambda: L(6, pipeline_model_parallel_size=4), LayoutError, "6"),
    ("expert-not-divisible", lambda: L(8, expert_model_parallel_size=3), LayoutError, "3"),
    ("unknown-token", lambda: L(8, order="tp-xp-dp"), LayoutError, "xp"),
    ("duplicate-token", lambda: L(8, order="tp-dp-tp"), LayoutError, "tp"),
    ("empty-token", lambda: L(8, order="tp--dp"), LayoutError, "tp--dp"),
    ("missing-token", lambda: L(8, pipeline_model_parallel_size=2, order="tp-dp"), LayoutError, "pp"),
    ("missing-ep-token", lambda: L(8, expert_model_parallel_size=2, order="tp-dp-pp"), LayoutError, "ep"),
    ("order-not-str", lambda: L(8, order=3), TypeError, "3"),
    ("sp-with-cp", lambda: L(8, sequence_parallel_size=2, context_parallel_size=2), LayoutError, "context"),
    ("sp-with-ep", lambda: L(8, sequence_parallel_size=2, expert_model_parallel_size=2), LayoutError, "expert"),
    ("negative-offset", lambda: L(8, rank_offset=-1), LayoutError, "-1"),
    ("pp-not-last-experts", lambda: L(16, pipeline_model_parallel_size=2, expert_model_parallel_size=2,
                                       expert_tensor_parallel_size=1, tensor_model_parallel_size=2,
                                       order="tp-pp-dp"), LayoutError, "pp"),
    ("unknown-kind", lambda: L(8).groups("tp-xx"), LayoutError, "xx"),
    ("mixed-kind", lambda: L(8).groups("tp-ep"), LayoutError, "tp-ep"),
    ("kind-not-str", lambda: L(8).groups(3), TypeError, "3"),
    ("rank-outside", lambda: L(4, rank_offset=4).groups_of(2), RankNotInLayoutError, "2"),
    ("rank-past-end", lambda: L(4).coordinates(4), RankNotInLayoutError, "4"),
]

CONFIG_CASES: list[tuple[str, Callable[[], Any], type, str]] = [
    ("config-contradiction", lambda: sizes_from_config({"tensor_model_parallel_size": 2,
                                                        "tensor_parallel": {"autotp_size": 4}}, {}),
     LayoutError, "autotp_size=4"),
    ("config-unknown-key", lambda: sizes_from_config({"scoped_parallel": {"tpp": 2}}, {}), LayoutError, "tpp"),
    ("config-str-size", lambda: sizes_from_config({"sequence_parallel_size": "4"}, {}), LayoutError, "'4'"),
    ("config-float-size", lambda: sizes_from_config({"sequence_parallel_size": 4.0}, {}), LayoutError, "4.0"),
    ("config-bad-type", lambda: ParallelState.from_config(3.5), TypeError, "float"),
    ("config-missing-file", lambda: ParallelState.from_config("/nonexistent/ds.json"), LayoutError, "nonexistent"),
]


def _state(**kw: Any) -> Callable[[], Any]:
    return lambda: ParallelState(**kw)


def _getter(name: str, *args: Any, **state_kw: Any) -> Callable[[], Any]:
    def call() -> Any:
        s = ParallelState(**state_kw)
        try:
            return getattr(s, name)(*args)
        finally:
            s.destroy()

    return call


def _destroyed_activate() -> None:
    s = ParallelState()
    s.destroy()
    s.activate()


def _bind_twice() -> None:
    a, b = ParallelState(name="a"), ParallelState(name="b")
    try:
        import torch

        engine = a.bind(torch.nn.Linear(1, 1))
        b.bind(engine)
    finally:
        a.destroy()
        b.destroy()


STATE_CASES: list[tuple[str, Callable[[], Any], type, str]] = [
    ("timeout-not-timedelta", _state(timeout=30), TypeError, "timedelta"),
    ("name-not-str", _state(name=5), TypeError, "5"),
    ("world-too-big", _state(world_size=16), LayoutError, "16"),
    ("offset-past-world", _state(rank_offset=8, world_size=1), LayoutError, "rank_offset=8"),
    ("offset-plus-size-past-world", _state(rank_offset=4, world_size=8), LayoutError, "4..11"),
    ("state-not-divisible", _state(tensor_model_parallel_size=3), LayoutError, "3"),
    ("pg-options-not-mapping", _state(pg_options=[1]), TypeError, "[1]"),
    ("pg-options-unknown-kind", _state(pg_options={"tq": None}), LayoutError, "tq"),
    ("backends-unknown-kind", _state(backends={"dpp": "gloo"}), LayoutError, "dpp"),
    ("no-gloo-twin", _getter("get_data_parallel_group_gloo"), GroupNotAvailableError, "create_gloo_process_groups"),
    ("partial-dp", _getter("get_data_parallel_group", False, True), GroupNotAvailableError, "partial"),
    ("embedding-non-member", _getter("get_embedding_group", pipeline_model_parallel_size=8),
     GroupNotAvailableError, "embd"),
    ("unknown-group-kind", _getter("group", "zz"), LayoutError, "zz"),
    ("non-member-getter", _getter("get_data_parallel_group", world_size=1), RankNotInLayoutError, "rank 1"),
    ("device-mesh-bad-dims", _getter("device_mesh", ("tp",), tensor_model_parallel_size=2), LayoutError, "dp"),
    ("destroyed-activate", _destroyed_activate, ScopedParallelError, "destroyed"),
    ("bind-twice", _bind_twice, ScopedParallelError, "already bound"),
]


def _check(call: Callable[[], Any], exc: type, text: str) -> None:
    from scoped_parallel.scope import current_state_or_none

    with pytest.raises(exc) as info:
        call()
    assert text in str(info.value), f"message does not name {text!r}: {info.value}"
    assert len(str(info.value)) > 25, f"message too terse to say the fix: {info.value}"
    assert current_state_or_none() is None, f"the failed call left {current_state_or_none()!r} active"


@pytest.mark.parametrize("case", LAYOUT_CASES + CONFIG_CASES, ids=lambda c: c[0])
def test_bad_layout_or_config_input(case):
    """Bad layout/config input raises its typed error with the value in the message."""
    _, call, exc, text = case
    _check(call, exc, text)


@pytest.mark.parametrize("case", STATE_CASES, ids=lambda c: c[0])
def test_bad_state_input_raises_before_any_communication(case):
    """Bad state input raises on one rank alone (no peer needed) and leaves no group behind."""
    import torch.distributed as dist

    _, call, exc, text = case
    with fake_world(8, 1):
        before = len(dist.distributed_c10d._world.pg_map)
        _check(call, exc, text)
        after = len(dist.distributed_c10d._world.pg_map)
        assert after == before, f"{after - before} process group(s) created before the error, expected none"


def test_state_without_distributed_says_how_to_initialize():
    """Building a state before init_process_group raises with the call to make."""
    with pytest.raises(DistributedNotInitializedError, match="init_process_group"):
        ParallelState()


# (argv, text the error output must contain)
CLI_CASES: list[tuple[list[str], str]] = [
    (["layout", "--world-size", "6", "--tp", "4"], "6"),
    (["layout", "--world-size", "4", "--order", "tp-qq"], "qq"),
    (["layout", "--world-size", "4", "--state", "x"], "NAME:key=value"),
    (["layout", "--world-size", "4", "--state", "x:tp=two"], "'two'"),
    (["layout", "--world-size", "4", "--rank", "9"], "9"),
]

# test_adapter_bad_input checks two inputs: an unknown adapter name and a strict getter
# called outside any scope
ADAPTER_CASE_COUNT = 2


@pytest.mark.parametrize("argv,text", CLI_CASES)
def test_bad_cli_input_exits_2(argv, text, capsys):
    """The CLI turns bad input into exit status 2 and a message naming the value."""
    status = cli(argv)
    assert status == 2, f"{argv}: exit status {status}, expected 2"
    err = capsys.readouterr().err
    assert text in err, f"{argv}: error output does not name {text!r}: {err!r}"


def test_adapter_bad_input():
    """Unknown adapter names and strict getters outside a scope raise typed errors."""
    from scoped_parallel import adapters

    with pytest.raises(ValueError, match="'deepspeedd'"):
        adapters.install(targets=("deepspeedd",))
    pytest.importorskip("megatron.core")
    with adapters.installed(strict=True, targets=("megatron",)):
        from megatron.core import parallel_state

        with pytest.raises(NoActiveStateError, match="strict"):
            parallel_state.get_tensor_model_parallel_world_size()


def test_corpus_has_at_least_forty_cases():
    """The corpus keeps at least 40 bad inputs."""
    counts = {
        "layout": len(LAYOUT_CASES),
        "config": len(CONFIG_CASES),
        "state": len(STATE_CASES),
        "cli": len(CLI_CASES),
        "adapter": ADAPTER_CASE_COUNT,
    }
    assert sum(counts.values()) >= 40, f"only {sum(counts.values())} bad inputs ({counts}), expected at least 40"




@pytest.mark.parametrize(
    "kwargs,needle",
    [
        (dict(num_distributed_optimizer_instances=0), "num_distributed_optimizer_instances must be an int >= 1, got 0"),
        (dict(num_distributed_optimizer_instances=3), "num_distributed_optimizer_instances=3 must divide"),
        (dict(context_parallel_size=4, hierarchical_context_parallel_sizes=[2, 3]), "multiply to 6"),
        (dict(hierarchical_context_parallel_sizes="22"), "must be a list of ints or None, got '22'"),
        (dict(hybrid_context_parallel="yes"), "hybrid_context_parallel must be True or False, got 'yes'"),
        (dict(create_all_gather_group=1), "create_all_gather_group must be True or False, got 1"),
    ],
)
def test_bad_megatron_option_raises_layout_error_naming_it_before_any_group(kwargs, needle):
    """Megatron's optional-group options are checked before any group or store key exists."""
    from scoped_parallel import ParallelState
    from scoped_parallel.groups import create as _groups
    from scoped_parallel.errors import LayoutError
    from scoped_parallel.testing import fake_world

    with fake_world(8, 0):
        before = _groups.creation_count()
        with pytest.raises(LayoutError) as err:
            ParallelState(**kwargs)
        assert needle in str(err.value), f"expected {needle!r} in {str(err.value)!r}"
        assert _groups.creation_count() == before, "a group was created before the check"
