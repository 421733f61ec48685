"""The Ulysses adapter: one UlyssesSPAttentionHF per state behind one dispatching attention wrapper.

The world scenarios run once per module (two ``world.run`` calls in all) and record
what they saw; each test then checks one behaviour from that record. The numerical
comparisons use ``rtol=1e-5, atol=1e-6`` rather than bit equality: a sharded run
splits every GEMM along the sequence and sums the parameter gradients of the SP
ranks with an all-reduce, so reductions run in another order than in the full run
(the all-to-all itself only moves data).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import pytest

pytest.importorskip("deepspeed")
pytest.importorskip("transformers")

BATCH = 2
SEQ = 16
RTOL, ATOL = 1e-5, 1e-6
# name -> (seed, hidden, heads, kv heads, vocab); kv heads divide heads and are divisible by SP
MODELS = {
    "a": (1, 32, 4, 2, 64),  # SP 2
    "b": (2, 64, 8, 4, 96),  # SP 4
    "c": (3, 32, 4, 4, 80),  # SP 1
}


# ---------------------------------------------------------------------- rank-side helpers


def _tiny_llama(name: str) -> Any:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    seed, hidden, heads, kv_heads, vocab = MODELS[name]
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=4 * SEQ,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).float().train()


def _batch(name: str) -> tuple[Any, Any]:
    """Input embeddings and the weights of the loss sum(logits * weights), equal on every rank."""
    import torch

    seed, hidden, _, _, vocab = MODELS[name]
    gen = torch.Generator().manual_seed(100 + seed)
    return torch.randn(BATCH, SEQ, hidden, generator=gen), torch.randn(BATCH, SEQ, vocab, generator=gen)


def _positions(start: int, stop: int) -> Any:
    import torch

    return torch.arange(start, stop).repeat(BATCH, 1)


def _full_run(model: Any, embeds: Any, weights: Any) -> dict[str, Any]:
    """Logits and gradients of the whole sequence in this process, no sequence parallelism."""
    x = embeds.clone().requires_grad_(True)
    logits = model(inputs_embeds=x, position_ids=_positions(0, SEQ)).logits
    (logits * weights).sum().backward()
    # every parameter but the unused token embedding (the run feeds inputs_embeds)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return {"logits": logits.detach(), "input_grad": x.grad, "grads": grads}


def _shard_forward(model: Any, embeds: Any, weights: Any, state: Any) -> tuple[Any, Any, Any]:
    """This rank's shard of the sequence through the model: (input leaf, logits, loss)."""
    rank, size = state.get_sequence_parallel_rank(), state.get_sequence_parallel_world_size()
    n = SEQ // size
    lo, hi = rank * n, (rank + 1) * n
    x = embeds[:, lo:hi].clone().requires_grad_(True)
    logits = model(inputs_embeds=x, position_ids=_positions(lo, hi)).logits
    return x, logits, (logits * weights[:, lo:hi]).sum()


def _compare(actual: Any, expected: Any) -> str | None:
    """None when close at RTOL and ATOL scaled by the tensor's magnitude, else the mismatch report.

    The absolute rounding error of a sum grows with the size of its terms: a parameter
    gradient of magnitude ~10 summed over SP ranks can differ by ~1e-6 in an element
    near zero, which a fixed atol of 1e-6 would flag.
    """
    import torch

    atol = ATOL * max(1.0, float(expected.abs().max()))
    try:
        torch.testing.assert_close(actual, expected, rtol=RTOL, atol=atol)
    except AssertionError as err:
        return str(err)
    return None


def _check_shard_run(model: Any, x: Any, logits: Any, state: Any, ref: dict[str, Any]) -> dict[str, Any]:
    """Gather the SP shards and compare logits, input and parameter gradients with the full run."""
    import torch
    import torch.distributed as dist

    group = state.get_sequence_parallel_group()
    size, rank = state.get_sequence_parallel_world_size(), state.get_sequence_parallel_rank()
    parts = [torch.empty_like(logits) for _ in range(size)]
    dist.all_gather(parts, logits.detach().contiguous(), group=group)
    full_logits = torch.cat(parts, dim=1)
    n = SEQ // size
    out: dict[str, Any] = {
        "logits": _compare(full_logits, ref["logits"]),
        "input_grad": _compare(x.grad, ref["input_grad"][:, rank * n : (rank + 1) * n]),
        "max_input_grad_diff": float((x.grad - ref["input_grad"][:, rank * n : (rank + 1) * n]).abs().max()),
        "max_logit_diff": float((full_logits - ref["logits"]).abs().max()),
        "params": {},
        "max_param_grad_diff": 0.0,
    }
    params = dict(model.named_parameters())
    for name in ref["grads"]:
        grad = params[name].grad.clone()
        dist.all_reduce(grad, group=group)  # each SP rank holds its shard's share of the gradient
        out["params"][name] = _compare(grad, ref["grads"][name])
        out["max_param_grad_diff"] = max(out["max_param_grad_diff"], float((grad - ref["grads"][name]).abs().max()))
    return out


@contextlib.contextmanager
def _counting_all_to_alls(counts: list[int]) -> Iterator[None]:
    """Count deepspeed.comm.all_to_all_single calls (what Ulysses' exchange op runs)."""
    import deepspeed.comm

    original = deepspeed.comm.all_to_all_single

    def counted(*args: Any, **kwargs: Any) -> Any:
        counts[0] += 1
        return original(*args, **kwargs)

    deepspeed.comm.all_to_all_single = counted
    try:
        yield
    finally:
        deepspeed.comm.all_to_all_single = original


def _register(model: Any, sp: int) -> Any:
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF

    return UlyssesSPAttentionHF.register_with_transformers(
        model,
        core_attn_implementation="sdpa",
        sequence_parallel_size=sp,
        max_length=SEQ,
        micro_batch_size=BATCH,
        seq_length_is_variable=True,
    )


def _forward_counted(fn: Any) -> tuple[Any, int]:
    counts = [0]
    with _counting_all_to_alls(counts):
        result = fn()
    return result, counts[0]


# ---------------------------------------------------------------------- rank functions


def _which(obj: Any, **named: Any) -> str:
    """The name of the candidate ``obj`` is (by identity), else a description of what it is."""
    for name, candidate in named.items():
        if obj is candidate:
            return name
    return f"another {type(obj).__name__}"


def _scenario_with_adapter(rank: int) -> dict[str, Any]:
    """Models A (SP 2), B (SP 4), C (SP 1) registered in their scopes, run interleaved."""
    import deepspeed.comm
    import torch
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from scoped_parallel import ParallelState, adapters
    from scoped_parallel.adapters import ulysses

    deepspeed.comm.init_distributed(dist_backend="gloo")  # wraps the running gloo world
    core = ALL_ATTENTION_FUNCTIONS["sdpa"]
    register_before = vars(UlyssesSPAttentionHF)["register_with_transformers"]
    models = {k: _tiny_llama(k) for k in MODELS}
    data = {k: _batch(k) for k in MODELS}
    refs = {k: _full_run(models[k], *data[k]) for k in MODELS}  # before anything is patched
    attn = {k: models[k].model.layers[0].self_attn for k in MODELS}
    out: dict[str, Any] = {}

    sa = ParallelState(name="ulysses-sp2", sequence_parallel_size=2)
    sb = ParallelState(name="ulysses-sp4", sequence_parallel_size=4)
    sc = ParallelState(name="ulysses-sp1")
    try:
        with adapters.installed(targets=("ulysses",)):
            with sa.activate():
                states = {"state a": sa, "state b": sb, "state c": sc, "parallel_state_sp": None}
                out["returned"] = {"a": _which(_register(models["a"], 2), **states)}
                inst_a, dispatcher = ulysses.instance_for(attn["a"]), ALL_ATTENTION_FUNCTIONS["sdpa"]
                out["again"] = {
                    "returned": _which(_register(models["a"], 2), **states),
                    "instance": _which(ulysses.instance_for(attn["a"]), first=inst_a),
                    "dispatcher": _which(ALL_ATTENTION_FUNCTIONS["sdpa"], first=dispatcher),
                }
            with sb.activate():
                out["returned"]["b"] = _which(_register(models["b"], 4), **states)
            with sc.activate():
                out["returned"]["c"] = _which(_register(models["c"], 1), **states)
            out["sdpa_entry"] = _which(ALL_ATTENTION_FUNCTIONS["sdpa"], first_dispatcher=dispatcher, core=core)
            out["dispatcher_core"] = _which(dispatcher.scoped_parallel_core, core=core)
            inst_b = ulysses.instance_for(attn["b"])
            sp_groups = {"a sp": sa.get_sequence_parallel_group(), "b sp": sb.get_sequence_parallel_group()}
            out["instances"] = {
                "a_size": inst_a.world_size,
                "b_size": inst_b.world_size,
                "a_group": _which(inst_a.process_group, **sp_groups),
                "b_group": _which(inst_b.process_group, **sp_groups),
                "a_wraps": _which(inst_a.attn, core=core),
                "b_wraps": _which(inst_b.attn, core=core),
                "c_instance": _which(ulysses.instance_for(attn["c"]), none=None),
            }

            # Interleaved: A and B forward in A's scope, B backward with no scope, A backward in
            # B's scope, C (SP 1) forward in A's scope, and A once more with no scope at all.
            with sa.activate():
                (xa, la, loss_a), out["a2a_a"] = _forward_counted(lambda: _shard_forward(models["a"], *data["a"], sa))
                (xb, lb, loss_b), out["a2a_b"] = _forward_counted(lambda: _shard_forward(models["b"], *data["b"], sb))
                logits_c, out["a2a_c"] = _forward_counted(
                    lambda: models["c"](inputs_embeds=data["c"][0], position_ids=_positions(0, SEQ)).logits.detach()
                )
            loss_b.backward()
            with sb.activate():
                loss_a.backward()
            out["a"] = _check_shard_run(models["a"], xa, la, sa, refs["a"])
            out["b"] = _check_shard_run(models["b"], xb, lb, sb, refs["b"])
            out["c_equal"] = bool(torch.equal(logits_c, refs["c"]["logits"]))
            models["a"].zero_grad(set_to_none=True)
            xa2, la2, loss_a2 = _shard_forward(models["a"], *data["a"], sa)
            loss_a2.backward()
            out["a_unscoped"] = _check_shard_run(models["a"], xa2, la2, sa, refs["a"])
        out["sdpa_after"] = _which(ALL_ATTENTION_FUNCTIONS["sdpa"], core=core)
        out["register_after"] = _which(vars(UlyssesSPAttentionHF)["register_with_transformers"], original=register_before)
    finally:
        for state in (sc, sb, sa):
            state.destroy()
    return out


def _scenario_without_adapter(rank: int) -> dict[str, Any]:
    """DeepSpeed alone: the second registration asserts; forced, it wraps the first wrapper."""
    import deepspeed.comm
    import torch.distributed as dist
    from deepspeed.runtime.sequence_parallel import parallel_state_sp
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    deepspeed.comm.init_distributed(dist_backend="gloo")
    core = ALL_ATTENTION_FUNCTIONS["sdpa"]
    local = ALL_ATTENTION_FUNCTIONS._local_mapping
    core_was_local = "sdpa" in local
    model_a, model_b = _tiny_llama("a"), _tiny_llama("b")
    out: dict[str, Any] = {}
    created = []

    def forget_sp_groups() -> None:
        for name in ("_SEQUENCE_PARALLEL_GROUP", "_SEQUENCE_DATA_PARALLEL_GROUP"):
            group = getattr(parallel_state_sp, name)
            if group is not None:
                created.append(group)
            setattr(parallel_state_sp, name, None)

    try:
        out["returned"] = _which(_register(model_a, 2), parallel_state_sp=parallel_state_sp)
        first_wrapper = ALL_ATTENTION_FUNCTIONS["sdpa"]
        try:
            _register(model_b, 4)
            out["second"] = None
        except AssertionError as err:
            out["second"] = str(err)
        forget_sp_groups()
        _register(model_b, 4)  # forced: what a reset of DeepSpeed's globals leads to
        second_wrapper = ALL_ATTENTION_FUNCTIONS["sdpa"]
        inner = [c.cell_contents for c in second_wrapper.__closure__ or ()]
        uattn = next(obj for obj in inner if isinstance(obj, UlyssesSPAttentionHF))
        out["forced_wraps"] = _which(uattn.attn, first_wrapper=first_wrapper, core=core)
        first_inner = next(
            c.cell_contents for c in first_wrapper.__closure__ or () if isinstance(c.cell_contents, UlyssesSPAttentionHF)
        )
        out["first_wraps"] = _which(first_inner.attn, core=core)
    finally:
        forget_sp_groups()
        for group in created:
            if group is not dist.GroupMember.WORLD:
                dist.destroy_process_group(group)
        if core_was_local:
            ALL_ATTENTION_FUNCTIONS["sdpa"] = core
        else:
            local.pop("sdpa", None)
    out["sdpa_after"] = _which(ALL_ATTENTION_FUNCTIONS["sdpa"], core=core)
    return out


# ---------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def with_adapter(world: Any) -> list[dict[str, Any]]:
    return world.run(_scenario_with_adapter, timeout=240)


@pytest.fixture(scope="module")
def without_adapter(world: Any) -> list[dict[str, Any]]:
    return world.run(_scenario_without_adapter, timeout=240)


def _failures(result: dict[str, Any]) -> dict[str, str]:
    bad = {k: result[k] for k in ("logits", "input_grad") if result[k] is not None}
    bad.update({k: v for k, v in result["params"].items() if v is not None})
    return bad


# ---------------------------------------------------------------------- world tests

@pytest.mark.world
def test_unpatched_second_registration_asserts(without_adapter: list[dict[str, Any]]) -> None:
    """Without the adapter DeepSpeed's second register_with_transformers hits its 'already initialized' assert."""
    for rank, result in enumerate(without_adapter):
        assert result["returned"] == "parallel_state_sp", f"rank {rank}: registration returned {result['returned']}"
        assert result["second"] is not None and "already initialized" in result["second"], (rank, result["second"])
        assert result["sdpa_after"] == "core", f"rank {rank}: sdpa entry after cleanup is {result['sdpa_after']}"


@pytest.mark.world
def test_unpatched_forced_second_registration_nests_wrappers(without_adapter: list[dict[str, Any]]) -> None:
    """With DeepSpeed's globals reset, the second registration wraps the first model's wrapper (two all-to-alls)."""
    for rank, result in enumerate(without_adapter):
        assert result["first_wraps"] == "core", f"rank {rank}: first wrapper wraps {result['first_wraps']}"
        assert result["forced_wraps"] == "first_wrapper", f"rank {rank}: forced wrapper wraps {result['forced_wraps']}"


@pytest.mark.world
def test_two_models_match_full_sequence_run(with_adapter: list[dict[str, Any]]) -> None:
    """SP=2 and SP=4 models give the logits and gradients of a single-process full-sequence run."""
    for rank, result in enumerate(with_adapter):
        for model in ("a", "b"):
            assert not _failures(result[model]), (rank, model, _failures(result[model]))


@pytest.mark.world
def test_dispatch_follows_the_module_not_the_scope(with_adapter: list[dict[str, Any]]) -> None:
    """Each model's attention runs its own state's instance, even under another state's scope or none."""
    for rank, result in enumerate(with_adapter):
        expected = {
            "a_size": 2,
            "b_size": 4,
            "a_group": "a sp",
            "b_group": "b sp",
            "a_wraps": "core",
            "b_wraps": "core",
            "c_instance": "none",
        }
        assert result["instances"] == expected, f"rank {rank}: instances {result['instances']}, expected {expected}"
        # 2 layers x (q, k, v, context) exchanges each: one all-to-all per tensor, never nested
        assert (result["a2a_a"], result["a2a_b"]) == (8, 8), rank
        assert not _failures(result["a_unscoped"]), (rank, _failures(result["a_unscoped"]))


@pytest.mark.world
def test_one_dispatcher_wraps_the_original_core(with_adapter: list[dict[str, Any]]) -> None:
    """Three registrations install a single dispatcher holding the original sdpa function."""
    for rank, result in enumerate(with_adapter):
        got = (result["sdpa_entry"], result["dispatcher_core"])
        assert got == ("first_dispatcher", "core"), f"rank {rank}: sdpa entry and dispatcher core are {got}"


@pytest.mark.world
def test_register_returns_the_active_state(with_adapter: list[dict[str, Any]]) -> None:
    """Inside a scope register_with_transformers returns the active state, not parallel_state_sp."""
    for rank, result in enumerate(with_adapter):
        expected = {"a": "state a", "b": "state b", "c": "state c"}
        assert result["returned"] == expected, f"rank {rank}: registrations returned {result['returned']}, expected {expected}"


@pytest.mark.world
def test_register_twice_in_a_scope_is_idempotent(with_adapter: list[dict[str, Any]]) -> None:
    """A second registration of the same model in the same scope keeps its instance and dispatcher."""
    for rank, result in enumerate(with_adapter):
        expected = {"returned": "state a", "instance": "first", "dispatcher": "first"}
        assert result["again"] == expected, f"rank {rank}: second registration gave {result['again']}, expected {expected}"


@pytest.mark.world
def test_sp1_model_goes_straight_to_core_attention(with_adapter: list[dict[str, Any]]) -> None:
    """A model of an SP=1 state runs the core function unchanged: same logits bit for bit, no all-to-all."""
    for rank, result in enumerate(with_adapter):
        assert result["c_equal"], f"rank {rank}: SP=1 model's logits differ from the unpatched run"
        assert result["a2a_c"] == 0, f"rank {rank}: SP=1 model ran {result['a2a_c']} all-to-alls, expected 0"


@pytest.mark.world
def test_uninstall_in_the_world_restores_originals(with_adapter: list[dict[str, Any]]) -> None:
    """Leaving adapters.installed() after registrations restores the sdpa entry and the classmethod."""
    for rank, result in enumerate(with_adapter):
        got = (result["sdpa_after"], result["register_after"])
        assert got == ("core", "original"), f"rank {rank}: after uninstall sdpa entry and classmethod are {got}"


# ---------------------------------------------------------------------- in-process tests


class _StubState:
    """Just enough of a ParallelState for registrations that build no process group."""

    def __init__(self, sp: int) -> None:
        self.sp = sp
        self.records: dict = {}

    def get_sequence_parallel_world_size(self) -> int:
        return self.sp

    def adapter_record(self, owner: str, factory: Any) -> Any:
        if owner not in self.records:
            self.records[owner] = factory(self)
        return self.records[owner]


def test_install_uninstall_round_trip_restores_by_identity() -> None:
    """uninstall() puts back ALL_ATTENTION_FUNCTIONS['sdpa'] and register_with_transformers by identity."""
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from scoped_parallel import adapters
    from scoped_parallel.scope import Activation

    core = ALL_ATTENTION_FUNCTIONS["sdpa"]
    method = vars(UlyssesSPAttentionHF)["register_with_transformers"]
    state = _StubState(1)
    with adapters.installed(targets=("ulysses",)):
        assert vars(UlyssesSPAttentionHF)["register_with_transformers"] is not method
        with Activation(state):
            assert _register(_tiny_llama("c"), 1) is state
        assert ALL_ATTENTION_FUNCTIONS["sdpa"] is not core
    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is core
    assert "sdpa" not in ALL_ATTENTION_FUNCTIONS._local_mapping
    assert vars(UlyssesSPAttentionHF)["register_with_transformers"] is method


def test_outside_any_scope_the_original_runs() -> None:
    """With no active scope the patched method is DeepSpeed's (SP=1 returns None, nothing installed)."""
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from scoped_parallel import adapters

    core = ALL_ATTENTION_FUNCTIONS["sdpa"]
    with adapters.installed(targets=("ulysses",)):
        assert UlyssesSPAttentionHF.register_with_transformers(_tiny_llama("c"), "sdpa", 1, BATCH) is None
        assert ALL_ATTENTION_FUNCTIONS["sdpa"] is core


def test_mismatch_with_the_scope_raises_before_any_collective() -> None:
    """A requested SP size that differs from the active state's is refused with both sizes named."""
    from scoped_parallel import LayoutError, adapters
    from scoped_parallel.scope import Activation

    with adapters.installed(targets=("ulysses",)), Activation(_StubState(2)):
        with pytest.raises(LayoutError, match=r"sequence_parallel_size=4.*sequence parallel size is 2"):
            _register(_tiny_llama("c"), 4)


def test_attention_entry_replaced_after_the_dispatcher_is_restored_and_reported() -> None:
    """An ALL_ATTENTION_FUNCTIONS entry replaced by someone else after registration is restored on
    uninstall, and the AdapterError names it (the ledger's rule for every adapter)."""
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from scoped_parallel import adapters
    from scoped_parallel.scope import Activation
    from scoped_parallel.errors import AdapterError

    core = ALL_ATTENTION_FUNCTIONS["sdpa"]
    method = vars(UlyssesSPAttentionHF)["register_with_transformers"]
    adapters.install(targets=("ulysses",))
    try:
        with Activation(_StubState(1)):
            _register(_tiny_llama("c"), 1)
        ALL_ATTENTION_FUNCTIONS["sdpa"] = lambda *args, **kwargs: None  # someone else's wrapper
    finally:
        with pytest.raises(AdapterError, match=r"ALL_ATTENTION_FUNCTIONS\['sdpa'\]"):
            adapters.uninstall(("ulysses",))
    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is core, "the original sdpa function must be restored anyway"
    assert "sdpa" not in ALL_ATTENTION_FUNCTIONS._local_mapping
    assert vars(UlyssesSPAttentionHF)["register_with_transformers"] is method
    assert not adapters.is_installed("ulysses")
