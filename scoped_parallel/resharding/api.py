"""The one call: ``reshard(src_model, src_state, dst_model, dst_state)``, its dry run
``plan_reshard``, the backends that know a kind of model, and the plan cache.

A backend turns two models and their states into a checked
:class:`~scoped_parallel.resharding.plan.ReshardPlan` (collective: every rank of the
world calls it, or with ``partial_ranks = True`` on the backend every rank of either
state) and then runs it. The adapters register theirs when
``scoped_parallel.adapters`` is imported: ``"megatron"`` (megatron-core models, each rank
planning its own part), ``"megatron-core"`` (megatron-core's own planner and executor, by
name only) and ``"flat"`` (any other torch module, DeepSpeed engines and ZeRO-3 partitions
included). The core knows none of them.

Plans are cached per pair of models and pair of states, keyed on the states' actual rank
lists (every group kind this rank holds, and the layout), and dropped from both states
when either is destroyed (the cache lives in each state's ``adapter_record``).

8-rank example (actor TP=2 x PP=2 x DP=2 trained, rollout TP=4 x DP=2 resharded)::

    actor_state = ParallelState(name="actor", tensor_model_parallel_size=2, pipeline_model_parallel_size=2)
    rollout_state = ParallelState(name="rollout", tensor_model_parallel_size=4)
    with actor_state.activate():
        actor = build_gpt()                  # megatron-core GPTModel, no groups passed
    with rollout_state.activate():
        rollout = build_gpt()
    print(plan_reshard(actor, actor_state, rollout, rollout_state).report())   # what will move
    for step in range(steps):
        train(actor)
        reshard(actor, actor_state, rollout, rollout_state)                    # planned once, cached
        generate(rollout)
"""

from __future__ import annotations

import inspect
import weakref
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Protocol

from scoped_parallel.errors import GroupNotAvailableError, ReshardError, describe_state
from scoped_parallel.resharding.plan import CastSpec, Piece, ReshardPlan

__all__ = ["Backend", "ReshardResult", "backends", "cast_spec", "pieces_match", "plan_reshard", "register_backend", "reshard", "whole_plan"]


@dataclass(frozen=True)
class ReshardResult:
    """What one :func:`reshard` call did on this rank: the plan it ran and the bytes this
    rank sent, by peer (equal to ``plan.bytes_between()`` for this rank's row)."""

    plan: ReshardPlan
    sent: Mapping[int, int]


class Backend(Protocol):
    """What a reshard backend provides (see ``adapters/megatron_reshard/``)."""

    name: str

    def claims(self, model: Any) -> bool:
        """Whether this backend knows how ``model`` (a module or a list of model chunks) is laid out."""

    def plan(self, src_model: Any, src_state: Any, dst_model: Any, dst_state: Any, *, cast: CastSpec = None) -> ReshardPlan:
        """The checked plan; collective over the world; raises ReshardError on every rank alike.
        ``cast``: ``dtype=`` of :func:`reshard` with dtypes as strings (resolve it per tensor
        with :func:`~scoped_parallel.resharding.plan.resolve_casts` on the gathered dtypes and mark
        the transfers' ``cast``); only passed when not None."""

    def execute(self, plan: ReshardPlan, src_model: Any, src_state: Any, dst_model: Any, dst_state: Any, **options: Any) -> dict[int, int] | None:
        """Move this rank's part of ``plan``; returns the bytes sent by peer. First, with
        :func:`~scoped_parallel.resharding.api.pieces_match`, every rank confirms that the models still hold the pieces the
        plan lists; if not, returns None on every rank and moves nothing."""


_BACKENDS: list[Backend] = []


def register_backend(backend: Backend) -> None:
    """Add ``backend`` (or replace the one with its name); earlier ones are asked first."""
    for i, known in enumerate(_BACKENDS):
        if known.name == backend.name:
            _BACKENDS[i] = backend
            return
    _BACKENDS.append(backend)


def backends() -> tuple[str, ...]:
    """The names of the registered backends, in the order they are asked."""
    return tuple(b.name for b in _BACKENDS)


def _backend(src_model: Any, dst_model: Any, name: str | None) -> Backend:
    if name is not None:
        for b in _BACKENDS:
            if b.name == name:
                return b
        raise ReshardError(f"no reshard backend named {name!r}; registered: {backends()} (import scoped_parallel.adapters to register them)")
    models = [m for m in (src_model, dst_model) if m is not None]  # None: this rank is not in that state
    if not models:
        raise ReshardError("reshard: both models are None on this rank; a rank in neither state must not call it")
    for b in _BACKENDS:
        if all(b.claims(m) for m in models):
            return b
    raise ReshardError(
        f"no reshard backend knows both {type(src_model).__name__} and {type(dst_model).__name__} "
        f"(registered: {backends() or 'none'}); `import scoped_parallel.adapters` registers "
        "'megatron' and 'flat', or pass backend= by name"
    )


def _chunks(model: Any) -> tuple[Any, ...]:
    return tuple(model) if isinstance(model, (list, tuple)) else (model,)


def _state_key(state: Any) -> tuple[Any, ...]:
    if state.destroyed:
        raise GroupNotAvailableError(f"{describe_state(state)} was destroyed; a reshard needs the states the models were built in")
    return (state.layout, tuple((kind, state.ranks(kind)) for kind in state.kinds()))


class _PlanCache:
    """One state's reshard plans (its ``adapter_record("reshard")``); an entry lives in the
    caches of both its states and leaves both when either state is destroyed."""

    def __init__(self, state: Any) -> None:
        self.entries: dict[Any, tuple[Any, ...]] = {}

    def state_destroyed(self, state: Any) -> None:
        for key, (_, _, partner) in list(self.entries.items()):
            partner.entries.pop(key, None)
        self.entries.clear()

    def drop_dead(self) -> None:
        """Forget the plans of models that no longer exist (from both caches)."""
        for key, (refs, _, partner) in list(self.entries.items()):
            if any(r() is None for r in refs):
                self.entries.pop(key, None)
                partner.entries.pop(key, None)


def _caches(src_state: Any, dst_state: Any) -> tuple[_PlanCache, _PlanCache]:
    return src_state.adapter_record("reshard", _PlanCache), dst_state.adapter_record("reshard", _PlanCache)


def _check_ranks(backend: Backend, src_state: Any, dst_state: Any, src_model: Any, dst_model: Any,
                 models_checked: bool = True) -> None:
    """Local checks, before any collective: a backend without ``partial_ranks`` needs both
    states on the whole world; else this rank must be in a state, and hold a model exactly
    for the states it is in (a rank outside both must not call; its peers are unaffected)."""
    import torch.distributed as dist

    world, rank = dist.get_world_size(), dist.get_rank()
    if not getattr(backend, "partial_ranks", False):
        for state in (src_state, dst_state):
            if tuple(state.layout.ranks) != tuple(range(world)):
                raise ReshardError(
                    f"{describe_state(state)} spans ranks {list(state.layout.ranks)[:8]}..., not the whole world of "
                    f"{world}; the {backend.name!r} reshard backend needs both states on every rank of the world "
                    "(the 'flat' and 'megatron' backends reshard between states on other or partial rank sets)"
                )
        return
    inside = [state.layout.contains(rank) for state in (src_state, dst_state)]
    if not any(inside):
        raise ReshardError(
            f"rank {rank} is in neither {describe_state(src_state)} nor {describe_state(dst_state)}: only the ranks of "
            "the two states call reshard (the others take no part)"
        )
    if not models_checked:
        return
    for role, state, model, member in (("source", src_state, src_model, inside[0]), ("destination", dst_state, dst_model, inside[1])):
        if member and model is None:
            raise ReshardError(f"rank {rank} is in {describe_state(state)} but passed no {role} model (None)")
        if not member and model is not None:
            raise ReshardError(f"rank {rank} is not in {describe_state(state)} but passed a {role} model: pass None there")


def _dtype_name(dtype: Any, where: str) -> str:
    import torch

    if not isinstance(dtype, torch.dtype):
        raise ReshardError(f"dtype= {where}: expected a torch.dtype, got {dtype!r}")
    if not dtype.is_floating_point:
        raise ReshardError(f"dtype= {where}: {dtype} is not a floating dtype; a reshard casts floating tensors only")
    return str(dtype)


def cast_spec(dtype: Any) -> tuple[CastSpec, Any]:
    """``dtype=`` of :func:`reshard` as the plan sees it (dtypes spelled as strings) and its
    part of the plan cache key. ``dtype`` is None, a ``torch.dtype`` (every floating tensor),
    a mapping ``{canonical name: torch.dtype}`` or a function ``name -> torch.dtype | None``
    (keyed by the function object itself: pass the same one to reuse the cached plan)."""
    if dtype is None:
        return None, None
    if isinstance(dtype, Mapping):
        spec = {str(name): _dtype_name(d, f"[{name!r}]") for name, d in dtype.items()}
        return spec, ("map", tuple(sorted(spec.items())))
    if callable(dtype) and not _is_dtype(dtype):
        def spec_fn(name: str) -> str | None:
            got = dtype(name)
            return None if got is None else _dtype_name(got, f"function's answer for {name!r}")

        return spec_fn, ("fn", dtype)
    spec = _dtype_name(dtype, "")
    return spec, ("all", spec)


def _is_dtype(obj: Any) -> bool:
    import torch

    return isinstance(obj, torch.dtype)


def plan_reshard(src_model: Any, src_state: Any, dst_model: Any, dst_state: Any, *, backend: str | None = None,
                 replan: bool = False, dtype: Any = None) -> ReshardPlan:
    """The dry run: the checked plan of ``reshard`` with the same arguments, nothing moved.

    Collective (every rank calls it, with its own chunks of both models). Print
    ``plan.report()`` for bytes per rank pair, staging memory per rank and the coverage
    check. Raises :class:`~scoped_parallel.errors.ReshardError` on every rank alike, naming
    the tensor, when the two models cannot be matched (other architecture, sizes that do
    not divide, a dtype change without ``dtype=``, a state that is not the one a model was
    built in). ``replan=True`` ignores the cached plan (every rank must pass the same value).

    ``dtype`` (see :func:`reshard`) is part of the plan: its transfers carry the wire dtype
    (``Transfer.cast``), so ``bytes_between()`` and the report count the converted bytes,
    and plans with different casts are cached apart.
    """
    chosen = _backend(src_model, dst_model, backend)
    spec, cast_key = cast_spec(dtype)
    key = (chosen.name, tuple(id(m) for m in _chunks(src_model)), tuple(id(m) for m in _chunks(dst_model)),
           _state_key(src_state), _state_key(dst_state), cast_key)
    src_cache, dst_cache = _caches(src_state, dst_state)
    models = [m for m in _chunks(src_model) + _chunks(dst_model) if m is not None]
    entry = None if replan else src_cache.entries.get(key)
    hit = False
    if entry is not None and dst_cache.entries.get(key) is not None:
        refs, cached, _ = entry
        alive = [r() for r in refs]
        hit = len(alive) == len(models) and all(a is b for a, b in zip(alive, models))
    if not replan and _everyone_hit(chosen, src_state, dst_state, hit):
        return cached  # type: ignore[no-any-return]
    _check_ranks(chosen, src_state, dst_state, src_model, dst_model)
    if spec is None:
        plan = chosen.plan(src_model, src_state, dst_model, dst_state)
    else:
        if "cast" not in inspect.signature(chosen.plan).parameters:
            raise ReshardError(f"the {chosen.name!r} reshard backend does not convert dtypes (its plan() takes no cast=); reshard without dtype=")
        plan = chosen.plan(src_model, src_state, dst_model, dst_state, cast=spec)
    plan = plan.check()
    refs = tuple(weakref.ref(m) for m in models)
    src_cache.drop_dead()
    dst_cache.drop_dead()
    src_cache.entries[key] = (refs, plan, dst_cache)
    dst_cache.entries[key] = (refs, plan, src_cache)
    return plan


def _everyone_hit(backend: Backend, src_state: Any, dst_state: Any, hit: bool) -> bool:
    """Whether every participant found its cached plan (one small all-reduce, only for a
    backend with ``partial_ranks``): a rank outside a state holds None for that model, so
    its cache cannot see that a peer's model is another one; a miss anywhere plans again
    everywhere. (A backend whose models live on every rank sees every change locally.)"""
    if not getattr(backend, "partial_ranks", False):
        return hit
    from scoped_parallel.resharding.execute import participants, participants_group

    _check_ranks(backend, src_state, dst_state, None, None, models_checked=False)
    return _everyone(hit, participants_group(src_state, dst_state, participants(src_state, dst_state)))


def _everyone(mine: bool, group: Any) -> bool:
    """Whether ``mine`` is True on every rank of ``group`` (one small all-reduce; the same answer everywhere)."""
    import torch
    import torch.distributed as dist

    from scoped_parallel.resharding.execute import comm_device

    flag = torch.tensor([int(mine)], device=comm_device(group))
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
    return bool(flag.item())


def _reshard_each(src_model: Any, src_state: Any, dst_models: Any, dst_states: Any, **kwargs: Any) -> tuple[ReshardResult | None, ...]:
    """:func:`reshard` into each of several destination copies (see there), in list order."""
    import torch.distributed as dist

    if not isinstance(dst_models, (list, tuple)) or len(dst_models) != len(dst_states):
        raise ReshardError(
            f"reshard into {len(dst_states)} destination states needs a list of as many destination models (this rank's "
            f"model in each, None where it is not a member); got {type(dst_models).__name__} "
            f"{'of ' + str(len(dst_models)) if isinstance(dst_models, (list, tuple)) else ''}".rstrip()
        )
    if kwargs.get("plan") is not None:
        raise ReshardError("reshard(plan=...) takes one destination; plan each copy with plan_reshard and call reshard per copy")
    rank = dist.get_rank()
    out: list[ReshardResult | None] = []
    for model, state in zip(dst_models, dst_states):
        if src_state.layout.contains(rank) or state.layout.contains(rank):
            out.append(reshard(src_model, src_state, model, state, **kwargs))
        else:
            out.append(None)
    return tuple(out)


def whole_plan(plan: ReshardPlan, src_state: Any, dst_state: Any) -> ReshardPlan:
    """The whole table of a plan that each rank planned alone (``plan.rank`` set: the
    ``"flat"`` and ``"megatron"`` backends), on every participant: every rank's part gathered
    over the ranks of both states and joined (each point-to-point transfer once, each gather
    once), so ``report()`` lists every rank and ``problems()`` checks the whole. Collective
    over those ranks; its cost grows with the ranks times their parts, so it is a dry-run
    tool, not something to call every step. A global plan (``rank`` None) is returned as it is.
    """
    if plan.rank is None:
        return plan
    import torch.distributed as dist

    from scoped_parallel.resharding.execute import participants, participants_group

    group = participants_group(src_state, dst_state, participants(src_state, dst_state))
    parts: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(parts, plan, group=group)
    transfers = dict.fromkeys(t for part in parts for t in part.transfers)
    gathers = dict.fromkeys(g for part in parts for g in part.gathers)
    staging = {rank: nbytes for part in parts for rank, nbytes in part.staging.items()}
    return ReshardPlan(plan.backend, tuple(transfers), tuple(p for part in parts for p in part.sources),
                       tuple(p for part in parts for p in part.targets), dict(sorted(staging.items())), plan.notes,
                       gathers=tuple(gathers), order=plan.order, participants=plan.participants)


def pieces_match(plan: ReshardPlan, sources: Iterable[Piece], targets: Iterable[Piece], group: Any = None) -> bool:
    """Whether, on every rank, ``sources``/``targets`` (this rank's pieces as the models hold
    them now) are the pieces ``plan`` lists for this rank. Collective over ``group`` (the
    reshard's ranks; the default group unless given): one small all-reduce, so every rank
    gets the same answer (for backends: call it before moving anything)."""
    import torch.distributed as dist

    planned_src, planned_dst = plan.pieces_of(dist.get_rank())
    return _everyone(_rows(sources) == planned_src and _rows(targets) == planned_dst, group)


def _rows(pieces: Iterable[Piece]) -> list[tuple[Any, ...]]:
    return sorted((p.name, p.shape, p.itemsize, p.dtype) for p in pieces)


def reshard(
    src_model: Any,
    src_state: Any,
    dst_model: Any,
    dst_state: Any,
    *,
    backend: str | None = None,
    plan: ReshardPlan | None = None,
    dtype: Any = None,
    **options: Any,
) -> Any:
    """Copy every parameter of ``src_model`` (laid out by ``src_state``) into ``dst_model``
    (the same architecture, laid out by ``dst_state``). Collective over the ranks of both
    states (a backend with ``partial_ranks``, such as ``"flat"`` and ``"megatron"``: a rank in
    only one state passes None for the other model, a rank in neither does not call; else the
    whole world).

    Dtypes must match unless ``dtype=`` asks for a conversion (else a ReshardError naming
    the tensor, both dtypes and the fix): ``dtype=torch.bfloat16`` converts every floating
    tensor, ``{"decoder.layers.0.mlp.linear_fc1.weight": torch.float16, ...}`` (canonical
    names, as ``plan.targets`` lists them) or a function ``name -> dtype | None`` (None: no
    cast) only those named. The target must be the destination tensor's dtype (checked on
    every rank before anything moves); integer and bool tensors are never cast. The
    *sender* converts each box before it leaves (local copies too), so an fp32 source into
    a bf16 destination sends bf16: ``ReshardResult.sent`` and ``plan.bytes_between()`` count those
    bytes. Every rank must pass the same ``dtype`` (a function: the same answers).

    The plan comes from :func:`plan_reshard` (cached after the first call) unless given;
    a given plan is checked again. Either way every rank first confirms that the models
    still hold the pieces the plan lists (:func:`~scoped_parallel.resharding.api.pieces_match`, one small all-reduce); a
    cached plan that no longer matches is made again, a given one raises. ``options`` go to the backend's executor
    (``bucket_bytes=`` for "flat" and "megatron"; "megatron-core": ``service=``, a megatron-core ``CopyService`` or backend name).
    Returns a :class:`~scoped_parallel.resharding.api.ReshardResult`: the plan that ran and the bytes this rank sent by peer.

    **Several destination copies in one call**: ``dst_state`` a list of states (rollout
    replicas, each on its own ranks) and ``dst_model`` the list of this rank's model in
    each (None where it is not a member). The copies are resharded one after another, in
    list order, each over the ranks of the source and that copy (a rank in neither skips
    it), and a tuple with one :class:`~scoped_parallel.resharding.api.ReshardResult` per copy is returned (None for those this rank
    skipped). Every rank must pass the same list of states.
    """
    if isinstance(dst_state, (list, tuple)):
        return _reshard_each(src_model, src_state, dst_model, dst_state, backend=backend, plan=plan, dtype=dtype, **options)
    chosen = _backend(src_model, dst_model, backend)
    given = plan is not None
    if plan is None:
        plan = plan_reshard(src_model, src_state, dst_model, dst_state, backend=chosen.name, dtype=dtype)
    else:
        if dtype is not None:
            raise ReshardError("reshard(plan=..., dtype=...): the casts are part of the plan; pass dtype= to plan_reshard instead")
        plan.check()
    sent = chosen.execute(plan, src_model, src_state, dst_model, dst_state, **options)
    if sent is None and not given:
        # a tensor changed shape, dtype or partition since the plan was made (e.g. a buffer
        # upcast by the first forward): plan again, on every rank alike, and run that
        plan = plan_reshard(src_model, src_state, dst_model, dst_state, backend=chosen.name, replan=True, dtype=dtype)
        sent = chosen.execute(plan, src_model, src_state, dst_model, dst_state, **options)
    if sent is None:
        raise ReshardError(
            "the plan does not match the models as they are now (a tensor changed shape, dtype or ZeRO-3 "
            "partition since it was planned); plan again with plan_reshard(..., replan=True). Nothing was moved."
        )
    return ReshardResult(plan, dict(sorted(sent.items())))
