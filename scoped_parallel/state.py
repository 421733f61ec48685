"""``ParallelState``: one model's process groups, with Megatron's and DeepSpeed's getter names.

A state is built collectively by the ranks of its layout (each rank creates
only the groups it belongs to), answers the getters from its own groups, and is
switched in with ``with state.activate():``. It is also a complete DeepSpeed
``mpu``: ``deepspeed.initialize(model=..., mpu=state)``.

Worked example on 8 ranks, ``ParallelState(name="actor", tensor_model_parallel_size=2,
pipeline_model_parallel_size=2)`` (so data parallel size 2). On rank 5:

===========================================  ===============
getter                                       rank 5 sees
===========================================  ===============
``get_tensor_model_parallel_group()``        ranks (4, 5), rank 1 of 2
``get_data_parallel_group()``                ranks (5, 7), rank 0 of 2
``get_pipeline_model_parallel_group()``      ranks (1, 5), rank 1 of 2 (last stage)
``get_model_parallel_group()``               ranks (0, 1, 4, 5) = tp x pp, rank 3 of 4
===========================================  ===============
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from scoped_parallel import _groups
from scoped_parallel._agree import agree
from scoped_parallel._config import SIZE_KEYS
from scoped_parallel._scope import Activation
from scoped_parallel.errors import (
    DistributedNotInitializedError,
    GroupNotAvailableError,
    LayoutError,
    RankNotInLayoutError,
    ScopedParallelError,
    StateMismatchError,
    UnsupportedSetupError,
)
from scoped_parallel.layout import ParallelLayout, _as_int, canonical_kind

__all__ = ["ParallelState"]

_GLOO_TWIN_KINDS = ("dp", "dp-cp", "edp")
_LAYOUT_KEYS = frozenset(SIZE_KEYS + ("order", "rank_offset"))  # ParallelLayout's keywords
_KIND_ALIASES = {"mp": "tp-pp", "model": "tp-pp", "dp-with-cp": "dp-cp"}
# Per (rank_offset, world_size): how many states this process constructed over that range,
# so that the fingerprint exchange of the k-th state meets the k-th state of its peers.
_CONSTRUCTIONS: dict[tuple[int, int], int] = {}
_EPOCH = ["0"]


def _reset_agreement(epoch: str) -> None:
    """Start a new numbering of state constructions (all ranks must call it alike).

    After a failed construction the ranks' counts may differ; a test harness (or a
    job that recovers from such a failure) resets them on every rank with a new,
    shared ``epoch`` so that old agreement keys are never read again.
    """
    _CONSTRUCTIONS.clear()
    _EPOCH[0] = str(epoch)


def _kind(kind: str) -> str:
    text = str(kind).strip().lower().replace("_", "-")
    return canonical_kind(_KIND_ALIASES.get(text, text))


def _per_kind(mapping: Mapping[str, Any] | None, what: str) -> dict[str, Any]:
    if mapping is None:
        return {}
    if not isinstance(mapping, Mapping):
        raise TypeError(f"{what} must be a mapping from group kind to value, got {mapping!r}")
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        try:
            out[_kind(key)] = value
        except LayoutError as err:
            raise LayoutError(f"{what}: {err}") from None
    return out


class ParallelState:
    """The process groups of one model's parallel layout.

    Args:
        name: a label used in messages, ``repr`` and group descriptions.
        tensor_model_parallel_size, pipeline_model_parallel_size, context_parallel_size,
        sequence_parallel_size, expert_model_parallel_size, expert_tensor_parallel_size,
        order: as in :class:`~scoped_parallel.ParallelLayout`.
        world_size: how many ranks the state spans (default: the rest of the world after
            ``rank_offset``). With ``rank_offset`` it places a model on a subset of ranks,
            e.g. an actor on ranks 0-3 and a critic on 4-7.
        backend: backend of every group (default: the default group's backend).
        timeout: a :class:`datetime.timedelta` for group creation/collectives and for the
            agreement check between ranks.
        share_groups: reuse a process group already held by another state when the ranks,
            backend, options and timeout are identical (reference-counted).
        backends: per-kind backend, e.g. ``{"dp": "gloo"}``.
        pg_options: per-kind backend options, e.g. ``{"dp": ProcessGroupNCCL.Options(...)}``.
        create_gloo_process_groups: also build gloo twins of the dp, dp-cp and edp groups
            (Megatron's CPU-side groups for checkpoint collectives).

    A rank outside ``rank_offset .. rank_offset + world_size - 1`` may construct the
    state (it builds nothing and waits for nobody); every getter then raises
    :class:`~scoped_parallel.errors.RankNotInLayoutError`.
    """

    def __init__(
        self,
        *,
        name: str | None = None,
        tensor_model_parallel_size: int = 1,
        pipeline_model_parallel_size: int = 1,
        context_parallel_size: int = 1,
        sequence_parallel_size: int = 1,
        expert_model_parallel_size: int = 1,
        expert_tensor_parallel_size: int | None = None,
        order: str = "tp-cp-ep-dp-pp",
        world_size: int | None = None,
        rank_offset: int = 0,
        backend: str | None = None,
        timeout: timedelta | None = None,
        share_groups: bool = True,
        backends: Mapping[str, str] | None = None,
        pg_options: Mapping[str, Any] | None = None,
        create_gloo_process_groups: bool = False,
    ) -> None:
        if name is not None and not isinstance(name, str):
            raise TypeError(f"name must be a str or None, got {name!r}")
        if timeout is not None and not isinstance(timeout, timedelta):
            raise TypeError(
                f"timeout must be a datetime.timedelta (as in torch.distributed), got {timeout!r}; "
                "e.g. timeout=datetime.timedelta(minutes=10)"
            )
        if not dist.is_available() or not dist.is_initialized():
            raise DistributedNotInitializedError(
                "ParallelState needs torch.distributed to be initialized first: call "
                "torch.distributed.init_process_group(...) (or deepspeed.init_distributed()) "
                "before building a state."
            )
        world = dist.get_world_size()
        bound = getattr(dist.distributed_c10d._get_default_group(), "bound_device_id", None)
        if bound is not None:
            raise UnsupportedSetupError(
                f"the default process group is bound to {bound} (init_process_group(device_id=...)), "
                "so torch would create every new group with ncclCommSplit, which needs all ranks of "
                "the world to take part; scoped_parallel creates groups on their members only. "
                "Initialize the default group without device_id (NCCL then creates communicators "
                "lazily, per group)."
            )
        rank_offset = _as_int("rank_offset", rank_offset)
        world_size = world - rank_offset if world_size is None else _as_int("world_size", world_size)
        if rank_offset >= world or rank_offset + world_size > world:
            raise LayoutError(
                f"ParallelState {name!r} spans ranks {rank_offset}..{rank_offset + world_size - 1} "
                f"(rank_offset={rank_offset}, world_size={world_size}) but the process world has "
                f"{world} ranks (0..{world - 1}); lower world_size or rank_offset."
            )
        self._layout = ParallelLayout(
            world_size,
            tensor_model_parallel_size=tensor_model_parallel_size,
            pipeline_model_parallel_size=pipeline_model_parallel_size,
            context_parallel_size=context_parallel_size,
            sequence_parallel_size=sequence_parallel_size,
            expert_model_parallel_size=expert_model_parallel_size,
            expert_tensor_parallel_size=expert_tensor_parallel_size,
            order=order,
            rank_offset=rank_offset,
        )
        self._name = name
        self._backend = backend
        self._timeout = timeout
        self._share = bool(share_groups)
        self._backends = _per_kind(backends, "backends")
        self._options = _per_kind(pg_options, "pg_options")
        self._gloo_twins = bool(create_gloo_process_groups)
        self._rank = dist.get_rank()
        self._groups: dict[str, Any] = {}
        self._gloo: dict[str, Any] = {}
        self._ranks_of: dict[str, tuple[int, ...]] = {}
        self._live_ranks: dict[str, tuple[int, ...]] = {}  # empty unless usable
        self._my_index: dict[str, int] = {}
        self._destroyed = False
        #: per-state data of the adapters (keyed by adapter name); opaque to the core
        self._adapter_slots: dict[str, Any] = {}
        #: answers memoized by scoped_parallel._scope.dispatching(memoize=True)
        self._memo: dict[Any, Any] = {}
        if not self._layout.contains(self._rank):
            return
        self._ranks_of = dict(self._layout.groups_of(self._rank))
        self._agree_with_peers()
        self._build()
        self._live_ranks = dict(self._ranks_of)
        self._my_index = {k: r.index(self._rank) for k, r in self._ranks_of.items()}

    # ------------------------------------------------------------------ alternate constructors

    @classmethod
    def from_config(cls, config: Any, **overrides: Any) -> ParallelState:
        """Build a state from a DeepSpeed config (dict, JSON path or ``DeepSpeedConfig``).

        Sizes come from ``overrides`` first, then the config (``tensor_parallel.autotp_size``,
        ``sequence_parallel_size``, a ``scoped_parallel`` section, ... see
        :mod:`scoped_parallel._config`), then the defaults. Contradictory or unknown values
        raise :class:`LayoutError` naming the key, before any communication.

        Example::

            ParallelState.from_config({"train_batch_size": 8, "sequence_parallel_size": 2},
                                      name="actor")
        """
        from scoped_parallel._config import load_config, sizes_from_config

        kwargs = sizes_from_config(load_config(config), overrides)
        expected_dp = kwargs.pop("_data_parallel_size", None)
        if expected_dp is not None and dist.is_available() and dist.is_initialized():
            offset = kwargs.get("rank_offset", 0)
            layout = ParallelLayout(
                kwargs.get("world_size") or dist.get_world_size() - offset,
                **{k: v for k, v in kwargs.items() if k in _LAYOUT_KEYS},
            )
            if expected_dp != layout.data_parallel_size:
                raise LayoutError(
                    f"config key 'data_parallel_size' is {expected_dp!r} but the layout {layout!r} "
                    f"derives data parallel size {layout.data_parallel_size}; remove the key or fix "
                    "the other sizes"
                )
        return cls(**kwargs)

    # ------------------------------------------------------------------ construction

    @property
    def _fake(self) -> bool:
        return str(dist.get_backend()) == "fake"

    def _fingerprint(self) -> str:
        """Everything that decides which groups this rank creates or shares, as text."""
        backends = ",".join(f"{k}={v}" for k, v in sorted(self._backends.items()))
        # Options objects differ per process; what must agree is their type and which kinds
        # share one object (that decides sharing).
        first: dict[int, str] = {}
        options = ",".join(
            f"{k}={type(v).__name__}@{first.setdefault(id(v), k)}" for k, v in sorted(self._options.items())
        )
        return (
            f"name={self._name!r};{self._layout.fingerprint()};backend={self._backend};"
            f"backends={backends};options={options};timeout={self._timeout};"
            f"gloo_twins={self._gloo_twins};share={self._share}"
        )

    def _agree_with_peers(self) -> None:
        """Check, before any group is created, that every peer built the same state.

        Runs :func:`scoped_parallel._agree.agree` over the default store: one leader per
        group reads its members' fingerprints, and one decision covers the whole state. A
        rank that disagrees, or never arrives within ``timeout``, makes every rank of the
        state raise :class:`StateMismatchError` instead of hanging inside group creation.
        """
        span = (self._layout.rank_offset, self._layout.world_size)
        seq = _CONSTRUCTIONS.get(span, 0)
        _CONSTRUCTIONS[span] = seq + 1
        self._tag = f"{_EPOCH[0]}/{span[0]}+{span[1]}/{seq}"
        if self._fake:
            return
        timeout = self._timeout or dist.distributed_c10d._get_default_timeout(
            dist.distributed_c10d.Backend(dist.get_backend())
        )
        where = f"construction #{seq} over ranks {span[0]}..{span[0] + span[1] - 1}"
        agree(
            dist.distributed_c10d._get_default_store(),
            f"scoped_parallel/agree/{self._tag}/",
            self._rank,
            self._layout.world_size,
            self._ranks_of.values(),
            self._fingerprint(),
            timeout.total_seconds(),
            lambda: f"{self._label()} ({where})",
        )

    def _requests(self) -> list[tuple[str, _groups.GroupRequest]]:
        out: list[tuple[str, _groups.GroupRequest]] = []
        label = self._name or "state"
        for kind, ranks in self._ranks_of.items():
            out.append(
                (
                    kind,
                    _groups.GroupRequest(
                        ranks=ranks,
                        backend=self._backends.get(kind, self._backend),
                        options=self._options.get(kind),
                        timeout=self._timeout,
                        desc=f"{label}:{kind}",
                    ),
                )
            )
        if self._gloo_twins:
            for kind in _GLOO_TWIN_KINDS:
                ranks = self._ranks_of[kind]
                out.append(
                    (
                        "gloo:" + kind,
                        _groups.GroupRequest(
                            ranks=ranks, backend="gloo", timeout=self._timeout, desc=f"{label}:{kind}:gloo"
                        ),
                    )
                )
        return out

    def _build(self) -> None:
        requests = self._requests()
        # One global order shared by all ranks: no circular waits between overlapping groups.
        requests.sort(key=lambda item: item[1].order_key())
        # Name each creation from what all its members agree on (see _groups).
        seen: dict[tuple[int, ...], int] = {}
        for i, (kind, request) in enumerate(requests):
            n = seen[request.ranks] = seen.get(request.ranks, -1) + 1
            requests[i] = (kind, dataclasses.replace(request, tag=f"{self._tag}/{n}"))
        acquired: list[Any] = []
        try:
            for kind, request in requests:
                group = _groups.acquire(request, share=self._share)
                acquired.append(group)
                if kind.startswith("gloo:"):
                    self._gloo[kind[5:]] = group
                else:
                    self._groups[kind] = group
        except BaseException:
            for group in reversed(acquired):
                _groups.release(group)
            self._groups.clear()
            self._gloo.clear()
            raise

    def destroy(self) -> None:
        """Release this state's groups (a shared group dies with its last user). Idempotent."""
        if self._destroyed:
            return
        self._destroyed = True
        self._live_ranks = {}
        self._my_index = {}
        self._adapter_slots.clear()  # adapters may cache answers derived from the groups
        self._memo.clear()
        held = list(self._groups.values()) + list(self._gloo.values())
        self._groups.clear()
        self._gloo.clear()
        for group in held:
            _groups.release(group)

    # ------------------------------------------------------------------ identity

    @property
    def name(self) -> str | None:
        return self._name

    @property
    def layout(self) -> ParallelLayout:
        return self._layout

    @property
    def rank(self) -> int:
        """This process's global rank."""
        return self._rank

    @property
    def is_member(self) -> bool:
        """Whether this rank belongs to the state's ranks."""
        return self._layout.contains(self._rank)

    @property
    def destroyed(self) -> bool:
        return self._destroyed

    def _label(self) -> str:
        return f"ParallelState {self._name!r}" if self._name else "ParallelState"

    def __repr__(self) -> str:
        sizes = repr(self._layout)[len("ParallelLayout(") : -1]
        where = f"rank {self._rank}" if self.is_member else f"rank {self._rank} (not a member)"
        gone = ", destroyed" if self._destroyed else ""
        head = f"{self._name!r}, " if self._name else ""
        return f"ParallelState({head}{sizes}; {where}{gone})"

    # ------------------------------------------------------------------ scope

    def activate(self) -> Activation:
        """A context manager / decorator making this state the current one.

        ``with actor.activate(): ...`` — nestable, exception-safe, per thread and per
        asyncio task (see the README's scope rules).
        """
        if self._destroyed:
            raise ScopedParallelError(
                f"{self._label()} was destroyed and cannot be activated; build a new ParallelState "
                "(with the same arguments on every rank) if you need its layout again"
            )
        return Activation(self)

    def bind(self, engine: Any) -> Any:
        """Make ``engine``'s calls run inside this state's scope; return the engine.

        Wraps ``engine(...)`` (``__call__``) and, where the engine has them,
        :data:`BOUND_METHODS` (forward, backward, step, train/eval batch, checkpoint
        save/load), so a training loop need not wrap every call in ``with``.
        Reversible with :meth:`unbind`; binding an engine that another state holds
        raises ``ScopedParallelError``. Works for any object (DeepSpeed engines,
        ``nn.Module`` s); the core imports nothing from DeepSpeed.
        """
        return _bind(self, engine)

    def unbind(self, engine: Any) -> Any:
        """Undo :meth:`bind`; return the engine."""
        return _unbind(self, engine)

    # ------------------------------------------------------------------ DeviceMesh view

    def device_mesh(self, dims: tuple[str, ...] | None = None, device_type: str | None = None) -> Any:
        """A ``torch.distributed.device_mesh.DeviceMesh`` over this state's own groups.

        No communicator is created: each mesh dimension is the state's group of that axis.
        ``dims`` names the dimensions, outermost first, from ``tp``, ``cp``, ``sp``, ``dp``,
        ``pp``; by default every axis of size > 1 in the layout's order, slowest first
        (e.g. ``("pp", "dp", "tp")`` for the default order), or ``("dp",)`` when all are 1.
        Every axis of size > 1 must be named, so the mesh covers exactly the state's ranks.
        """
        import torch
        from torch.distributed.device_mesh import DeviceMesh

        self._require("tp")
        sizes = self._layout.sizes()
        tokens = [t for t in self._layout.order.split("-") if t in ("tp", "cp", "sp", "dp", "pp")]
        if dims is None:
            dims = tuple(t for t in reversed(tokens) if sizes[t] > 1) or ("dp",)
        dims = tuple(dims)
        bad = [d for d in dims if d not in tokens]
        missing = [t for t in tokens if sizes[t] > 1 and t not in dims]
        if bad or missing or len(set(dims)) != len(dims):
            raise LayoutError(
                f"device_mesh(dims={dims!r}): dims must be distinct axes from {tokens} and include "
                f"every axis of size > 1 ({[t for t in tokens if sizes[t] > 1]}); "
                f"unknown: {bad}, missing: {missing}"
            )
        # Ranks of the state as a grid with one dimension per order token, slowest first.
        grid = torch.arange(self._layout.world_size, dtype=torch.int).reshape(
            [sizes[t] for t in reversed(tokens)]
        ) + self._layout.rank_offset
        axes = list(reversed(tokens))
        keep = list(dims) + [t for t in axes if t not in dims]
        mesh = grid.permute([axes.index(t) for t in keep]).reshape([sizes[t] for t in dims])
        if device_type is None:
            device_type = "cuda" if str(dist.get_backend(self.group(dims[0]))) == "nccl" else "cpu"
        groups = [self.group(d) for d in dims]
        return DeviceMesh.from_group(
            groups if len(groups) > 1 else groups[0],
            device_type,
            mesh=mesh if len(groups) > 1 else mesh.reshape(-1).tolist(),
            mesh_dim_names=dims,
        )

    # ------------------------------------------------------------------ generic access

    def _require(self, kind: str) -> str:
        if self._destroyed:
            raise GroupNotAvailableError(
                f"{self._label()} was destroyed; its groups are gone. Build a new ParallelState "
                "to use this layout again"
            )
        if not self.is_member:
            lo = self._layout.rank_offset
            raise RankNotInLayoutError(
                f"rank {self._rank} is not part of {self._label()} (ranks {lo}..{lo + self._layout.world_size - 1}), "
                "so it holds none of its groups; only call its getters on its own ranks "
                "(check state.is_member)."
            )
        kind = _kind(kind)
        if kind not in self._ranks_of:
            if kind in ("embd", "pos-embd"):
                raise GroupNotAvailableError(
                    f"rank {self._rank} is not in an {kind!r} group of {self._label()} (only the "
                    "first/last pipeline stages are); check is_rank_in_embedding_group() first."
                )
            raise GroupNotAvailableError(
                f"{self._label()} holds no {kind!r} group; it holds {sorted(self._ranks_of)}."
            )
        return kind

    # Fast paths for the named getters: ``kind`` is canonical there, so a dict lookup
    # answers; anything unusual (destroyed, non-member, missing kind) takes the slow
    # path through _require, which raises the explanatory error.
    def _g(self, kind: str) -> Any:
        try:
            return self._groups[kind]
        except KeyError:
            return self.group(kind)

    def _k(self, kind: str) -> tuple[int, ...]:
        try:
            return self._live_ranks[kind]
        except KeyError:
            return self.ranks(kind)

    def _n(self, kind: str) -> int:
        try:
            return len(self._live_ranks[kind])
        except KeyError:
            return self.size(kind)

    def _r(self, kind: str) -> int:
        try:
            return self._my_index[kind]
        except KeyError:
            return self.rank_in(kind)

    def group(self, kind: str) -> Any:
        """The process group of ``kind`` (e.g. ``"tp"``, ``"dp-cp"``, ``"etp-ep"``) on this rank."""
        return self._groups[self._require(kind)]

    def ranks(self, kind: str) -> tuple[int, ...]:
        """Global ranks of this rank's ``kind`` group."""
        return self._ranks_of[self._require(kind)]

    def size(self, kind: str) -> int:
        return len(self.ranks(kind))

    def rank_in(self, kind: str) -> int:
        """This rank's index inside its ``kind`` group."""
        return self.ranks(kind).index(self._rank)

    def kinds(self) -> tuple[str, ...]:
        """The group kinds this rank holds."""
        return tuple(self._ranks_of)

    def gloo_group(self, kind: str) -> Any:
        kind = self._require(kind)
        if kind not in self._gloo:
            raise GroupNotAvailableError(
                f"{self._label()} has no gloo twin of {kind!r}; build it with "
                "create_gloo_process_groups=True (twins exist for dp, dp-cp and edp)."
            )
        return self._gloo[kind]

    # ------------------------------------------------------------------ Megatron: tensor / pipeline

    def is_initialized(self) -> bool:
        return not self._destroyed

    def model_parallel_is_initialized(self) -> bool:
        return not self._destroyed and self.is_member

    def get_tensor_model_parallel_group(self, check_initialized: bool = True) -> Any:
        return self._g("tp")

    def get_tensor_model_parallel_world_size(self) -> int:
        return self._n("tp")

    def get_tensor_model_parallel_rank(self) -> int:
        return self._r("tp")

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self._k("tp")[0]

    def get_tensor_model_parallel_last_rank(self) -> int:
        return self._k("tp")[-1]

    def get_tensor_model_parallel_ranks(self) -> tuple[int, ...]:
        return self._k("tp")

    def get_pipeline_model_parallel_group(self, check_initialized: bool = True) -> Any:
        return self._g("pp")

    def get_pipeline_model_parallel_world_size(self) -> int:
        return self._n("pp")

    def get_pipeline_model_parallel_rank(self) -> int:
        return self._r("pp")

    def get_pipeline_model_parallel_first_rank(self) -> int:
        return self._k("pp")[0]

    def get_pipeline_model_parallel_last_rank(self) -> int:
        return self._k("pp")[-1]

    def get_pipeline_model_parallel_next_rank(self) -> int:
        ranks = self._k("pp")
        return ranks[(self._r("pp") + 1) % len(ranks)]

    def get_pipeline_model_parallel_prev_rank(self) -> int:
        ranks = self._k("pp")
        return ranks[(self._r("pp") - 1) % len(ranks)]

    def is_pipeline_first_stage(self, ignore_virtual: bool = True, vp_stage: int | None = None) -> bool:
        return self._r("pp") == 0

    def is_pipeline_last_stage(self, ignore_virtual: bool = True, vp_stage: int | None = None) -> bool:
        return self._r("pp") == self._n("pp") - 1

    # DeepSpeed's PipelineParallelGrid names (utils/bwc.py probes these).
    def get_pipe_parallel_group(self) -> Any:
        return self._g("pp")

    def get_pipe_parallel_world_size(self) -> int:
        return self._n("pp")

    def get_pipe_parallel_rank(self) -> int:
        return self._r("pp")

    # ------------------------------------------------------------------ model parallel = tp x pp

    def get_model_parallel_group(self, check_initialized: bool = True) -> Any:
        """Megatron's model-parallel group: tensor x pipeline parallel ranks.

        Group, size and rank always describe this same group (Megatron's legacy
        ``get_model_parallel_world_size`` reported TP's size, which is only the same
        thing when PP == 1).
        """
        return self._g("tp-pp")

    def get_model_parallel_world_size(self) -> int:
        return self._n("tp-pp")

    def get_model_parallel_rank(self) -> int:
        return self._r("tp-pp")

    def get_model_parallel_src_rank(self) -> int:
        return self._k("tp-pp")[0]

    # ------------------------------------------------------------------ data / context parallel

    def _dp_kind(self, with_context_parallel: bool, partial_data_parallel: bool = False) -> str:
        if partial_data_parallel:
            raise GroupNotAvailableError(
                "partial data parallel groups (num_distributed_optimizer_instances > 1) are "
                "not built by scoped_parallel; call with partial_data_parallel=False."
            )
        return "dp-cp" if with_context_parallel else "dp"

    def get_data_parallel_group(
        self,
        with_context_parallel: bool = False,
        partial_data_parallel: bool = False,
        independent_all_gather: bool = False,
    ) -> Any:
        """Data-parallel group; excludes SP ranks (they see the same batch), see sequence_data."""
        if not (with_context_parallel or partial_data_parallel):
            group = self._groups.get("dp")  # hot: DeepSpeed asks at every step
            if group is not None:
                return group
        if with_context_parallel and independent_all_gather and not partial_data_parallel:
            raise GroupNotAvailableError(
                "the separate all-gather twin of the dp-cp group (Megatron's "
                "independent_all_gather=True) is not built by scoped_parallel; call with "
                "independent_all_gather=False"
            )
        return self._g(self._dp_kind(with_context_parallel, partial_data_parallel))

    def get_data_parallel_group_gloo(
        self, with_context_parallel: bool = False, partial_data_parallel: bool = False
    ) -> Any:
        return self.gloo_group(self._dp_kind(with_context_parallel, partial_data_parallel))

    def get_data_parallel_world_size(
        self, with_context_parallel: bool = False, partial_data_parallel: bool = False
    ) -> int:
        return self._n(self._dp_kind(with_context_parallel, partial_data_parallel))

    def get_data_parallel_rank(
        self, with_context_parallel: bool = False, partial_data_parallel: bool = False
    ) -> int:
        return self._r(self._dp_kind(with_context_parallel, partial_data_parallel))

    def get_data_parallel_src_rank(self, with_context_parallel: bool = False) -> int:
        return self._k(self._dp_kind(with_context_parallel))[0]

    def get_data_parallel_group_ranks(self) -> tuple[int, ...]:
        return self._k("dp")

    def get_data_parallel_global_ranks(self, with_context_parallel: bool = False) -> tuple[int, ...]:
        return self._k(self._dp_kind(with_context_parallel))

    def get_context_parallel_group(self, check_initialized: bool = True) -> Any:
        return self._g("cp")

    def get_context_parallel_world_size(self) -> int:
        return self._n("cp")

    def get_context_parallel_rank(self) -> int:
        return self._r("cp")

    def get_context_parallel_global_ranks(self, check_initialized: bool = True) -> tuple[int, ...]:
        return self._k("cp")

    def get_tensor_and_data_parallel_group(
        self, check_initialized: bool = True, with_context_parallel: bool = False
    ) -> Any:
        return self._g("tp-dp-cp" if with_context_parallel else "tp-dp")

    def get_tensor_and_data_parallel_world_size(self, with_context_parallel: bool = False) -> int:
        return self._n("tp-dp-cp" if with_context_parallel else "tp-dp")

    def get_tensor_and_data_parallel_rank(self, with_context_parallel: bool = False) -> int:
        return self._r("tp-dp-cp" if with_context_parallel else "tp-dp")

    def get_tensor_and_context_parallel_group(self, check_initialized: bool = True) -> Any:
        return self._g("tp-cp")

    def get_tensor_and_context_parallel_world_size(self) -> int:
        return self._n("tp-cp")

    def get_tensor_and_context_parallel_rank(self) -> int:
        return self._r("tp-cp")

    # ------------------------------------------------------------------ DeepSpeed sequence parallel

    def get_sequence_parallel_group(self) -> Any:
        return self._g("sp")

    def get_sequence_parallel_world_size(self) -> int:
        return self._n("sp")

    def get_sequence_parallel_rank(self) -> int:
        return self._r("sp")

    def get_sequence_data_parallel_group(self) -> Any:
        """SP x DP: the ranks that shard ZeRO state and all-reduce gradients together."""
        group = self._groups.get("sp-dp")  # hot: DeepSpeed asks at every step
        return group if group is not None else self._g("sp-dp")

    def get_sequence_data_parallel_world_size(self) -> int:
        return self._n("sp-dp")

    def get_sequence_data_parallel_rank(self) -> int:
        return self._r("sp-dp")

    # ------------------------------------------------------------------ experts

    def get_expert_model_parallel_group(self, check_initialized: bool = True) -> Any:
        return self._g("ep")

    def get_expert_model_parallel_world_size(self) -> int:
        return self._n("ep")

    def get_expert_model_parallel_rank(self) -> int:
        return self._r("ep")

    def get_expert_tensor_parallel_group(self, check_initialized: bool = True) -> Any:
        return self._g("etp")

    def get_expert_tensor_parallel_world_size(self) -> int:
        return self._n("etp")

    def get_expert_tensor_parallel_rank(self) -> int:
        return self._r("etp")

    def get_expert_tensor_and_model_parallel_group(self, check_initialized: bool = True) -> Any:
        return self._g("etp-ep")

    def get_expert_tensor_and_model_parallel_world_size(self) -> int:
        return self._n("etp-ep")

    def get_expert_tensor_and_model_parallel_rank(self) -> int:
        return self._r("etp-ep")

    def get_expert_tensor_model_pipeline_parallel_group(self, check_initialized: bool = True) -> Any:
        return self._g("etp-ep-pp")

    def get_expert_data_parallel_group(
        self, check_initialized: bool = True, partial_expert_data_parallel: bool = False
    ) -> Any:
        self._dp_kind(False, partial_expert_data_parallel)
        return self._g("edp")

    def get_expert_data_parallel_group_gloo(self, partial_expert_data_parallel: bool = False) -> Any:
        self._dp_kind(False, partial_expert_data_parallel)
        return self.gloo_group("edp")

    def get_expert_data_parallel_world_size(self, partial_expert_data_parallel: bool = False) -> int:
        self._dp_kind(False, partial_expert_data_parallel)
        return self._n("edp")

    def get_expert_data_parallel_rank(self, partial_expert_data_parallel: bool = False) -> int:
        self._dp_kind(False, partial_expert_data_parallel)
        return self._r("edp")

    # ------------------------------------------------------------------ embeddings

    def is_rank_in_embedding_group(self, ignore_virtual: bool = True, vp_stage: int | None = None) -> bool:
        self._require("tp")
        return "embd" in self._ranks_of

    def is_rank_in_position_embedding_group(self) -> bool:
        self._require("tp")
        return "pos-embd" in self._ranks_of

    def get_embedding_group(self, check_initialized: bool = True) -> Any:
        return self._g("embd")

    def get_position_embedding_group(self, check_initialized: bool = True) -> Any:
        return self._g("pos-embd")


#: Engine methods that :meth:`ParallelState.bind` runs inside the state's scope.
BOUND_METHODS = (
    "forward",
    "backward",
    "step",
    "train_batch",
    "eval_batch",
    "save_checkpoint",
    "load_checkpoint",
)
_BOUND_ATTR = "_scoped_parallel_bound_state"
_SAVED_ATTR = "_scoped_parallel_saved_methods"
_SCOPED_CLASSES: dict[type, type] = {}


def _scoped_call(self: Any, *args: Any, **kwargs: Any) -> Any:
    state = self.__dict__[_BOUND_ATTR]
    with state.activate():
        return super(type(self), self).__call__(*args, **kwargs)


def _scoped_class(cls: type) -> type:
    sub = _SCOPED_CLASSES.get(cls)
    if sub is None:
        sub = type(cls.__name__, (cls,), {"__call__": _scoped_call, "__module__": cls.__module__})
        sub.__qualname__ = cls.__qualname__
        _SCOPED_CLASSES[cls] = sub
    return sub


def _bind(state: ParallelState, engine: Any) -> Any:
    holder = getattr(engine, "__dict__", {}).get(_BOUND_ATTR)
    if holder is state:
        return engine
    if holder is not None:
        raise ScopedParallelError(
            f"{type(engine).__name__} is already bound to {holder._label()}; an engine belongs to "
            f"one state. Call {holder._label()}.unbind(engine) first if you really mean to move it."
        )
    wrapped = {}
    for name in BOUND_METHODS:
        method = getattr(engine, name, None)
        if callable(method):
            wrapped[name] = state.activate()(method)
    # Instance attributes of those names that existed before (patched methods) come back on unbind.
    saved = {name: engine.__dict__[name] for name in wrapped if name in engine.__dict__}
    object.__setattr__(engine, _BOUND_ATTR, state)
    object.__setattr__(engine, _SAVED_ATTR, saved)
    for name, fn in wrapped.items():
        object.__setattr__(engine, name, fn)
    if callable(engine):
        object.__setattr__(engine, "__class__", _scoped_class(type(engine)))
    return engine


def _unbind(state: ParallelState, engine: Any) -> Any:
    holder = getattr(engine, "__dict__", {}).get(_BOUND_ATTR)
    if holder is None:
        return engine
    if holder is not state:
        raise ScopedParallelError(
            f"{type(engine).__name__} is bound to {holder._label()}, not to {state._label()}; "
            f"call {holder._label()}.unbind(engine) instead"
        )
    for name in BOUND_METHODS:
        engine.__dict__.pop(name, None)
    engine.__dict__.update(engine.__dict__.pop(_SAVED_ATTR, {}))
    del engine.__dict__[_BOUND_ATTR]
    if type(engine) in _SCOPED_CLASSES.values():
        object.__setattr__(engine, "__class__", type(engine).__mro__[1])
    return engine


# DeepSpeed treats an mpu that has `initialize_sequence_parallel` as its SP-only module
# (data-parallel group -> WORLD). A state is a full mpu, so it must never grow one.
assert not hasattr(ParallelState, "initialize_sequence_parallel")
