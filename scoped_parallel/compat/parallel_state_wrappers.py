"""DeepSpeed PR #7726's ``parallel_state_wrappers`` API, with contextvar scoping.

Code written against the PR's module switches by changing one import line::

    # from deepspeed.utils import parallel_state_wrappers as ps
    from scoped_parallel.compat import parallel_state_wrappers as ps

    actor = ps.get_parallel_state_instance("actor")
    actor.initialize_model_parallel(tensor_model_parallel_size=2)
    with ps.set_current_parallel_state("actor"):
        engine, *_ = deepspeed.initialize(model=model, config=config, mpu=actor)
        dp = ps.get_data_parallel_group()        # the actor's
    ps.get_data_parallel_group(name="actor")     # the same group, no scope needed

Same names, signatures, return types and exception types as the PR: DeepSpeed PR #7726's
own test file passes against this module unmodified, with and without
:func:`scoped_parallel.adapters.install` (``tests/compat/test_deepspeed_pr7726.py``).
``get_parallel_state_instance(name)`` returns a :class:`ParallelState` (this module's,
the PR's shape: ``initialize_model_parallel`` then the getters; ``deepspeed.initialize``
keeps it as ``engine.mpu``); ``get_model_parallel_world_size``/``_rank`` are the
tensor-parallel ones; ``get_data_parallel_group_ranks`` is a list; using an uninitialised
instance or initialising one twice raises an ``AssertionError``
(:class:`ParallelStateNotInitializedError`, :class:`ParallelStateAlreadyInitializedError`),
and refused arguments a ``NotImplementedError`` (:class:`UnsupportedArgumentError`), each
also a :class:`~scoped_parallel.errors.ScopedParallelError`. The PR's
``deepspeed.utils.parallel_state`` is :mod:`scoped_parallel.compat.parallel_state`.

Where this module deliberately differs, and why:

* ``set_current_parallel_state(name)`` enters the named state's scope
  (:meth:`ParallelState.activate <scoped_parallel.ParallelState.activate>`): per thread
  and per asyncio task, checked on exit, usable as a decorator; the PR switches one
  module global, which another thread or task sees too. With
  :func:`scoped_parallel.adapters.install`, DeepSpeed's own getters follow it as well. The
  named instance must be initialised first.
* A getter with ``name=None`` answers from the innermost scope (any
  :class:`scoped_parallel.ParallelState`, not only the registry's), else from the default
  instance; with ``name=`` from that instance, no scope needed.
* ``get_parallel_state_instance(None)`` and ``get_parallel_state_instance("__default__")``
  are one object (in the PR they are two, and the PR's "current" default is the second).
* ``context_parallel_size > 1`` is refused by ``initialize_model_parallel`` too, not only
  by ``initialize_parallel_state_from_config`` as in the PR: DeepSpeed has no context
  parallelism, so an engine built on such an instance would reduce gradients over the
  data-parallel group only and silently leave the CP peers out.
* Supported where the PR raises: sequence parallelism together with TP or PP, and
  :meth:`ParallelStateInstance.destroy`. Refused as well (the PR accepts them, before any
  collective): several distributed-optimizer instances, custom embedding-rank functions,
  NCCL config files and high-priority stream groups (use
  :class:`scoped_parallel.ParallelState`'s ``pg_options``).
* ``initialize_parallel_state_from_config`` reads every size key the core reads
  (:meth:`ParallelState.from_config <scoped_parallel.ParallelState.from_config>`), and
  for an initialised instance returns it only if the requested layout is its layout
  (the PR silently ignores the request).
* ZeRO++ all-to-all groups are cut from the instance's own ZeRO data-parallel ranks
  (see :mod:`scoped_parallel.adapters.deepspeed.zeropp`); the PR cuts them from the world.

DeepSpeed is imported lazily, only by the all-to-all functions.
"""

from __future__ import annotations

import inspect
import threading
from datetime import timedelta
from typing import Any, Callable

from scoped_parallel.errors import LayoutError, ScopedParallelError
from scoped_parallel.getters.table import GETTERS as _TABLE
from scoped_parallel.scope import Activation, current_state_or_none
from scoped_parallel.state import ParallelState as _CoreState

__all__ = [
    "DEFAULT_NAME",
    "ParallelState",
    "ParallelStateAlreadyInitializedError",
    "ParallelStateInstance",
    "ParallelStateNotInitializedError",
    "UnsupportedArgumentError",
    "get_all_to_all_groups",
    "get_current_parallel_state",
    "get_parallel_state",
    "get_parallel_state_instance",
    "initialize_all_to_all_groups",
    "initialize_parallel_state_from_config",
    "is_initialized",
    "set_current_parallel_state",
    "set_tensor_model_parallel_rank",
    "set_tensor_model_parallel_world_size",
]

#: the registry name of the default instance (``name=None``)
DEFAULT_NAME = "__default__"
#: the PR's default ``order`` (no ``cp`` token)
DEFAULT_ORDER = "tp-ep-dp-pp"


class ParallelStateNotInitializedError(ScopedParallelError, RuntimeError, AssertionError):
    """An instance was used before ``initialize_model_parallel`` (an ``AssertionError``, as in the PR)."""


class ParallelStateAlreadyInitializedError(LayoutError, AssertionError):
    """``initialize_model_parallel`` on an initialised instance (an ``AssertionError``, as in the PR)."""


class UnsupportedArgumentError(LayoutError, NotImplementedError):
    """An argument this module refuses (a ``NotImplementedError``, the PR's type for its refusals)."""


#: arguments this module refuses -> (the value that is accepted, why the others are refused)
_REFUSED: dict[str, tuple[Any, str]] = {
    "context_parallel_size": (
        1,
        "DeepSpeed has no context parallelism: its gradient all-reduce and ZeRO partitions would "
        "span the data parallel group only and leave the context parallel peers out; set "
        "context_parallel_size=1 (the CP ranks become data parallel ranks), or build a "
        "scoped_parallel.ParallelState for a Megatron model",
    ),
    "hierarchical_context_parallel_sizes": (None, "remove it (it needs context parallelism)"),
    "num_distributed_optimizer_instances": (1, "leave it at 1 (one distributed-optimizer instance)"),
    "get_embedding_ranks": (None, "leave it unset (embedding ranks follow Megatron's default rule)"),
    "get_position_embedding_ranks": (None, "leave it unset (embedding ranks follow Megatron's default rule)"),
    "nccl_communicator_config_path": (
        None, "build a scoped_parallel.ParallelState with pg_options={kind: options} instead"
    ),
    "high_priority_stream_groups": (
        None, "build a scoped_parallel.ParallelState with pg_options={kind: options} instead"
    ),
}


def refuse_unsupported(**arguments: Any) -> None:
    """Raise :class:`UnsupportedArgumentError` for the first argument this module refuses.

    Called before any group exists, so no rank waits in a collective. The message starts
    the way the PR's own refusals do ("... does not support <argument> ...").
    """
    for argument, value in arguments.items():
        accepted, fix = _REFUSED[argument]
        if value is None or value == accepted:
            continue
        raise UnsupportedArgumentError(
            f"scoped_parallel's DeepSpeed compat does not support {argument}={value!r}: {fix}"
        )


class ParallelStateInstance:
    """A named handle from :func:`get_parallel_state_instance`, built later by
    :meth:`initialize_model_parallel`; then a complete DeepSpeed mpu (every getter of
    :class:`~scoped_parallel.ParallelState` answers through it)."""

    def __init__(self, name: str | None = None) -> None:
        self._name = name
        self._state: _CoreState | None = None
        self.virtual_pipeline_model_parallel_size: int | None = None

    @property
    def name(self) -> str | None:
        """The registry name (``None`` for a handle of a state built elsewhere)."""
        return self._name

    @property
    def state(self) -> _CoreState:
        """The :class:`~scoped_parallel.ParallelState` behind this instance."""
        if self._state is None or self._state.destroyed:
            raise ParallelStateNotInitializedError(
                f"parallel state {self._name!r} is not initialized; call "
                f"get_parallel_state_instance({self._name!r}).initialize_model_parallel(...) first"
            )
        return self._state

    # DeepSpeed and the adapters unwrap the instance to its state (see adapters.deepspeed.initialize).
    @property
    def _scoped_parallel_state_(self) -> _CoreState:
        return self.state

    def is_initialized(self) -> bool:
        """Whether :meth:`initialize_model_parallel` built the state (and it is not destroyed)."""
        return self._state is not None and not self._state.destroyed

    def initialize_model_parallel(
        self,
        tensor_model_parallel_size: int = 1,
        pipeline_model_parallel_size: int = 1,
        virtual_pipeline_model_parallel_size: int | None = None,
        pipeline_model_parallel_comm_backend: str | None = None,
        context_parallel_size: int = 1,
        sequence_parallel_size: int = 1,
        hierarchical_context_parallel_sizes: list[int] | None = None,
        expert_model_parallel_size: int = 1,
        num_distributed_optimizer_instances: int = 1,
        expert_tensor_parallel_size: int | None = None,
        distributed_timeout_minutes: int = 30,
        order: str = DEFAULT_ORDER,
        get_embedding_ranks: Callable[..., Any] | None = None,
        get_position_embedding_ranks: Callable[..., Any] | None = None,
        create_gloo_process_groups: bool = False,
    ) -> None:
        """Build the groups (collective over the world, like the PR); see the module doc for what differs."""
        if self.is_initialized():
            raise ParallelStateAlreadyInitializedError(
                f"parallel state {self._name!r} is already initialized ({self._state!r}); call "
                "destroy() on it first, or use another name"
            )
        refuse_unsupported(
            context_parallel_size=context_parallel_size,
            hierarchical_context_parallel_sizes=hierarchical_context_parallel_sizes,
            num_distributed_optimizer_instances=num_distributed_optimizer_instances,
            get_embedding_ranks=get_embedding_ranks,
            get_position_embedding_ranks=get_position_embedding_ranks,
        )
        if isinstance(distributed_timeout_minutes, bool) or not isinstance(distributed_timeout_minutes, (int, float)):
            raise LayoutError(
                f"distributed_timeout_minutes must be a number of minutes, got {distributed_timeout_minutes!r}"
            )
        backends = {"pp": pipeline_model_parallel_comm_backend} if pipeline_model_parallel_comm_backend else None
        self._state = _CoreState(
            name=self._name,
            tensor_model_parallel_size=tensor_model_parallel_size,
            pipeline_model_parallel_size=pipeline_model_parallel_size,
            context_parallel_size=context_parallel_size,
            sequence_parallel_size=sequence_parallel_size,
            expert_model_parallel_size=expert_model_parallel_size,
            expert_tensor_parallel_size=expert_tensor_parallel_size,
            order=order,
            timeout=timedelta(minutes=distributed_timeout_minutes),
            backends=backends,
            create_gloo_process_groups=create_gloo_process_groups,
        )
        self.virtual_pipeline_model_parallel_size = virtual_pipeline_model_parallel_size

    def get_model_parallel_world_size(self) -> int:
        """The tensor-parallel size, as in the PR (DeepSpeed reads it as its model-parallel size)."""
        return self.state.get_tensor_model_parallel_world_size()

    def get_model_parallel_rank(self) -> int:
        """The tensor-parallel rank, as in the PR."""
        return self.state.get_tensor_model_parallel_rank()

    def get_data_parallel_group_ranks(self) -> list[int]:
        """This rank's data-parallel group as a list of global ranks, as in the PR."""
        return list(self.state.get_data_parallel_group_ranks())

    def get_virtual_pipeline_model_parallel_world_size(self) -> int | None:
        """The ``virtual_pipeline_model_parallel_size`` given at initialisation (recorded only)."""
        return self.virtual_pipeline_model_parallel_size

    def initialize_all_to_all_groups(self) -> dict[str, Any]:
        """This state's ZeRO++ all-to-all groups (created on first use, see the module doc)."""
        from scoped_parallel.adapters.deepspeed.zeropp import all_to_all_groups

        return all_to_all_groups(self.state)

    def get_all_to_all_groups(self) -> dict[str, Any]:
        """Same as :meth:`initialize_all_to_all_groups` (the PR's getter also creates)."""
        return self.initialize_all_to_all_groups()

    def destroy(self) -> None:
        """Release the groups; the name can be initialised again."""
        if self._state is not None:
            self._state.destroy()
            self._state = None

    def __getattr__(self, attribute: str) -> Any:
        if attribute.startswith("__") or attribute in ("_name", "_state"):
            raise AttributeError(attribute)
        return getattr(self.state, attribute)

    def __repr__(self) -> str:
        inner = repr(self._state) if self.is_initialized() else "not initialized"
        return f"ParallelStateInstance({self._name!r}: {inner})"


#: the PR's class name: ``isinstance(get_parallel_state_instance("a"), ParallelState)`` holds and
#: ``ParallelState()`` is an unnamed, uninitialised instance, as in the PR
ParallelState = ParallelStateInstance

_LOCK = threading.Lock()
_REGISTRY: dict[str, ParallelStateInstance] = {}
#: the owner name of this module's per-state record (a handle of a state built elsewhere)
_OWNER = "compat"


def _handle_of(state: _CoreState) -> ParallelStateInstance:
    handle = ParallelStateInstance(None)
    handle._state = state
    return handle


def get_parallel_state_instance(name: str | None = None) -> ParallelStateInstance:
    """The instance registered under ``name`` (``None``: the default one), created uninitialised on first use."""
    if name is not None and not isinstance(name, str):
        raise TypeError(f"name must be a str or None, got {name!r}")
    key = DEFAULT_NAME if name is None else name
    with _LOCK:
        instance = _REGISTRY.get(key)
        if instance is None:
            instance = _REGISTRY[key] = ParallelStateInstance(key)
        return instance


def set_current_parallel_state(name: str | None = None) -> Activation:
    """A context manager (and decorator) entering the scope of the instance named ``name``."""
    return get_parallel_state_instance(name).state.activate()


def get_current_parallel_state() -> ParallelStateInstance:
    """The instance of the innermost scope, else the default instance."""
    state = current_state_or_none()
    if state is None:
        return get_parallel_state_instance(None)
    with _LOCK:
        for instance in _REGISTRY.values():
            if instance._state is state:
                return instance
        return state.adapter_record(_OWNER, _handle_of)


def get_parallel_state(name: str | None = None) -> ParallelStateInstance:
    """The instance named ``name``, or the current one (:func:`get_current_parallel_state`) when ``None``."""
    return get_current_parallel_state() if name is None else get_parallel_state_instance(name)


def _state(name: str | None) -> _CoreState:
    return get_parallel_state(name).state


def is_initialized(name: str | None = None) -> bool:
    """Whether the named (or current) instance is initialised."""
    return get_parallel_state(name).is_initialized()


def set_tensor_model_parallel_world_size(world_size: int, name: str | None = None) -> None:
    """Override what ``get_tensor_model_parallel_world_size`` (and the model-parallel one) answers for the state."""
    _state(name).set_override("tp_size", world_size)


def set_tensor_model_parallel_rank(rank: int, name: str | None = None) -> None:
    """Override what ``get_tensor_model_parallel_rank`` (and the model-parallel one) answers for the state."""
    _state(name).set_override("tp_rank", rank)


def initialize_all_to_all_groups(name: str | None = None) -> dict[str, Any]:
    """The state's ZeRO++ all-to-all groups by DeepSpeed's keys (``local_<node>``, ``global_<local rank>``)."""
    return get_parallel_state(name).initialize_all_to_all_groups()


def get_all_to_all_groups(name: str | None = None) -> dict[str, Any]:
    """Same as :func:`initialize_all_to_all_groups`."""
    return initialize_all_to_all_groups(name)


def _get_local_all_to_all_group(name: str | None = None) -> dict[str, Any]:
    """``groups._get_local_all_to_all_group``'s spelling of :func:`get_all_to_all_groups`."""
    return initialize_all_to_all_groups(name)


# ---------------------------------------------------------------------- the PR's module-level getters
#
# Every getter takes ``name=None`` first (then the PR's flags) and asks the named
# instance's state, or the current scope's. Which state method answers and its doc
# come from the getter table (scoped_parallel.getters.table); the flags are the PR's
# signature. As in the PR, ``get_model_parallel_world_size``/``_rank`` report the
# tensor-parallel size and rank, while ``get_model_parallel_group`` is the
# model-parallel (tp x pp) group.

_WRAPPERS = __name__
_NAME = inspect.Parameter("name", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None)
#: the flags the PR's getters take; which of them a getter takes is the getter table's ``keywords``
_PR_FLAGS = ("with_context_parallel", "partial_data_parallel", "partial_expert_data_parallel")
#: the PR's getters (its signature: ``name`` first, then the flags its table row lists)
_PR_GETTERS: tuple[str, ...] = (
    "get_tensor_model_parallel_group", "get_tensor_model_parallel_world_size", "get_tensor_model_parallel_rank",
    "get_tensor_model_parallel_src_rank",
    "get_model_parallel_group", "get_model_parallel_world_size", "get_model_parallel_rank",
    "get_data_parallel_group", "get_data_parallel_world_size", "get_data_parallel_rank",
    "get_pipeline_model_parallel_group", "get_pipeline_model_parallel_world_size", "get_pipeline_model_parallel_rank",
    "get_context_parallel_group", "get_context_parallel_world_size", "get_context_parallel_rank",
    "get_sequence_parallel_group", "get_sequence_parallel_world_size", "get_sequence_parallel_rank",
    "get_sequence_data_parallel_group", "get_sequence_data_parallel_world_size", "get_sequence_data_parallel_rank",
    "get_expert_model_parallel_group", "get_expert_model_parallel_world_size", "get_expert_model_parallel_rank",
    "get_expert_tensor_parallel_group", "get_expert_tensor_parallel_world_size", "get_expert_tensor_parallel_rank",
    "get_expert_data_parallel_group", "get_expert_data_parallel_world_size", "get_expert_data_parallel_rank",
    "get_embedding_group", "get_tensor_and_data_parallel_group", "get_tensor_and_context_parallel_group",
)
#: the PR's model-parallel size and rank are the tensor-parallel ones
_ANSWERED_BY = {
    "get_model_parallel_world_size": "get_tensor_model_parallel_world_size",
    "get_model_parallel_rank": "get_tensor_model_parallel_rank",
}


def _flag(flag: str) -> inspect.Parameter:
    return inspect.Parameter(flag, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=False)


def _getter(public: str) -> Callable[..., Any]:
    method = _ANSWERED_BY.get(public, public)
    if method not in _TABLE:
        raise TypeError(f"compat getter {public!r} answers with {method!r}, which the getter table lacks")
    flags = tuple(k for k in _TABLE[method].keywords if k in _PR_FLAGS)

    def getter(name: str | None = None, *args: Any, **kwargs: Any) -> Any:
        bound = dict(zip(flags, args))
        bound.update(kwargs)
        unknown = sorted(set(bound) - set(flags))
        if unknown or len(args) > len(flags):
            raise TypeError(f"{public}() got unexpected arguments {unknown or args[len(flags):]}; it takes name, {flags}")
        return getattr(_state(name), method)(**bound)

    what = (getattr(_CoreState, method).__doc__ or method).strip().splitlines()[0]
    getter.__name__ = getter.__qualname__ = public
    getter.__module__ = _WRAPPERS
    getter.__doc__ = f"The named instance's state answers, or the current scope's (``name=None``): {what}"
    getter.__signature__ = inspect.Signature([_NAME, *map(_flag, flags)])  # type: ignore[attr-defined]
    return getter


GETTERS: dict[str, Callable[..., Any]] = {public: _getter(public) for public in _PR_GETTERS}
globals().update(GETTERS)
__all__ += sorted(GETTERS)

#: ``initialize_parallel_state_from_config`` keywords that set a layout size or the order
_SIZE_OVERRIDES = (
    "tensor_model_parallel_size",
    "pipeline_model_parallel_size",
    "context_parallel_size",
    "expert_model_parallel_size",
    "expert_tensor_parallel_size",
    "sequence_parallel_size",
    "order",
)


def initialize_parallel_state_from_config(
    config: Any,
    name: str | None = None,
    tensor_model_parallel_size: int | None = None,
    pipeline_model_parallel_size: int | None = None,
    virtual_pipeline_model_parallel_size: int | None = None,
    pipeline_model_parallel_comm_backend: str | None = None,
    context_parallel_size: int | None = None,
    hierarchical_context_parallel_sizes: list[int] | None = None,
    expert_model_parallel_size: int | None = None,
    num_distributed_optimizer_instances: int | None = None,
    expert_tensor_parallel_size: int | None = None,
    sequence_parallel_size: int | None = None,
    nccl_communicator_config_path: str | None = None,
    distributed_timeout_minutes: int | None = None,
    order: str | None = None,
    create_gloo_process_groups: bool | None = None,
    high_priority_stream_groups: list[str] | None = None,
) -> Any:
    """Initialise the named instance from a DeepSpeed config (dict, JSON path or ``DeepSpeedConfig``).

    Arguments > config > defaults. Sizes are read from the config keys
    :meth:`ParallelState.from_config <scoped_parallel.ParallelState.from_config>` reads
    (dotted paths such as ``tensor_parallel.autotp_size`` included). An instance
    initialised already is returned when its layout is the requested one, else a
    :class:`~scoped_parallel.errors.LayoutError` names both. Returns the instance (an
    mpu for ``deepspeed.initialize``).
    """
    from scoped_parallel.layout.config import load_config, sizes_from_config

    refuse_unsupported(
        nccl_communicator_config_path=nccl_communicator_config_path,
        high_priority_stream_groups=high_priority_stream_groups,
        hierarchical_context_parallel_sizes=hierarchical_context_parallel_sizes,
    )
    local = locals()
    overrides = {key: local[key] for key in _SIZE_OVERRIDES if local[key] is not None}
    sizes = sizes_from_config(load_config(config), overrides)
    sizes.pop("name", None)
    expected_dp = sizes.pop("_data_parallel_size", None)
    instance = get_parallel_state_instance(name)
    if instance.is_initialized():
        requested = {k: v for k, v in sizes.items() if k != "order"}
        have = instance.state.layout
        differ = {k: (v, getattr(have, k)) for k, v in requested.items() if getattr(have, k) != v}
        if differ:
            raise LayoutError(
                f"parallel state {instance.name!r} is already initialized with another layout: "
                + ", ".join(f"{k} requested {v[0]}, has {v[1]}" for k, v in differ.items())
                + "; destroy() it first, or use another name"
            )
        return instance
    extra = {
        "virtual_pipeline_model_parallel_size": virtual_pipeline_model_parallel_size,
        "pipeline_model_parallel_comm_backend": pipeline_model_parallel_comm_backend,
        "hierarchical_context_parallel_sizes": hierarchical_context_parallel_sizes,
        "num_distributed_optimizer_instances": num_distributed_optimizer_instances,
        "distributed_timeout_minutes": distributed_timeout_minutes,
        "create_gloo_process_groups": create_gloo_process_groups,
    }
    kwargs = {**sizes, **{k: v for k, v in extra.items() if v is not None}}
    if expected_dp is not None:
        import torch.distributed as dist

        from scoped_parallel.layout.config import check_data_parallel_size

        check_data_parallel_size({k: v for k, v in sizes.items()}, expected_dp, dist.get_world_size())
    instance.initialize_model_parallel(**kwargs)
    return instance


