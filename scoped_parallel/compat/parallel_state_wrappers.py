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

Same names, signatures and meanings as the PR, with these differences:

* ``set_current_parallel_state(name)`` enters the named state's scope
  (:meth:`ParallelState.activate <scoped_parallel.ParallelState.activate>`): per thread
  and per asyncio task, checked on exit, usable as a decorator; the PR switches one
  module global. With :func:`scoped_parallel.adapters.install`, DeepSpeed's own getters
  follow it too. The named instance must be initialised first.
* A getter with ``name=None`` answers from the innermost scope (any
  :class:`~scoped_parallel.ParallelState`, not only the registry's), else from the default
  instance; with ``name=`` from that instance, no scope needed.
* ``get_parallel_state_instance(None)`` and ``get_parallel_state_instance("__default__")``
  are one object (in the PR they differ).
* Supported where the PR refuses: ``context_parallel_size > 1`` (with the default
  order, ``cp`` is placed after ``tp``), sequence parallelism together with TP or PP,
  and :meth:`ParallelStateInstance.destroy`. Not supported (a
  :class:`~scoped_parallel.errors.LayoutError` naming the argument, before any
  collective): hierarchical context parallelism, several distributed-optimizer
  instances, custom embedding-rank functions, NCCL config files and high-priority
  stream groups (use :class:`~scoped_parallel.ParallelState`'s ``pg_options``).
* ``initialize_parallel_state_from_config`` reads every size key the core reads
  (:meth:`ParallelState.from_config <scoped_parallel.ParallelState.from_config>`), and
  for an initialised instance returns it only if the requested layout is its layout
  (the PR silently ignores the request).
* ZeRO++ all-to-all groups are cut from the instance's own ZeRO data-parallel ranks
  (see :mod:`scoped_parallel.adapters.deepspeed.zeropp`); the PR cuts them from the world.

DeepSpeed is imported lazily, only by the all-to-all functions.
"""

from __future__ import annotations

import threading
import weakref
from datetime import timedelta
from typing import Any, Callable

from scoped_parallel._scope import Activation, current_state_or_none
from scoped_parallel.errors import LayoutError, ScopedParallelError
from scoped_parallel.state import ParallelState

__all__ = [
    "DEFAULT_NAME",
    "ParallelStateInstance",
    "ParallelStateNotInitializedError",
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


class ParallelStateNotInitializedError(ScopedParallelError, RuntimeError):
    """An instance was used before ``initialize_model_parallel``."""


class ParallelStateInstance:
    """A named handle from :func:`get_parallel_state_instance`, built later by
    :meth:`initialize_model_parallel`; then a complete DeepSpeed mpu (every getter of
    :class:`~scoped_parallel.ParallelState` answers through it)."""

    def __init__(self, name: str | None) -> None:
        self._name = name
        self._state: ParallelState | None = None
        self.virtual_pipeline_model_parallel_size: int | None = None

    @property
    def name(self) -> str | None:
        """The registry name (``None`` for a handle of a state built elsewhere)."""
        return self._name

    @property
    def state(self) -> ParallelState:
        """The :class:`~scoped_parallel.ParallelState` behind this instance."""
        if self._state is None or self._state.destroyed:
            raise ParallelStateNotInitializedError(
                f"parallel state {self._name!r} is not initialized; call "
                f"get_parallel_state_instance({self._name!r}).initialize_model_parallel(...) first"
            )
        return self._state

    # DeepSpeed and the adapters unwrap the instance to its state (see adapters.deepspeed.initialize).
    @property
    def _scoped_parallel_state_(self) -> ParallelState:
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
            raise LayoutError(
                f"parallel state {self._name!r} is already initialized ({self._state!r}); call "
                "destroy() on it first, or use another name"
            )
        refused = {
            "hierarchical_context_parallel_sizes": hierarchical_context_parallel_sizes is not None,
            "num_distributed_optimizer_instances": num_distributed_optimizer_instances != 1,
            "get_embedding_ranks": get_embedding_ranks is not None,
            "get_position_embedding_ranks": get_position_embedding_ranks is not None,
        }
        for argument, bad in refused.items():
            if bad:
                raise LayoutError(
                    f"initialize_model_parallel({argument}=...) is not supported by scoped_parallel; "
                    "leave it at its default"
                )
        if isinstance(distributed_timeout_minutes, bool) or not isinstance(distributed_timeout_minutes, (int, float)):
            raise LayoutError(
                f"distributed_timeout_minutes must be a number of minutes, got {distributed_timeout_minutes!r}"
            )
        if order == DEFAULT_ORDER and context_parallel_size != 1:
            order = "tp-cp-ep-dp-pp"
        backends = {"pp": pipeline_model_parallel_comm_backend} if pipeline_model_parallel_comm_backend else None
        self._state = ParallelState(
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


_LOCK = threading.Lock()
_REGISTRY: dict[str, ParallelStateInstance] = {}
#: handles of states built elsewhere, found as the current scope's state
_HANDLES: weakref.WeakKeyDictionary[ParallelState, ParallelStateInstance] = weakref.WeakKeyDictionary()
#: set_tensor_model_parallel_world_size / _rank overrides, per state
_TP_OVERRIDES: weakref.WeakKeyDictionary[ParallelState, dict[str, int]] = weakref.WeakKeyDictionary()


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
        handle = _HANDLES.get(state)
        if handle is None:
            handle = _HANDLES[state] = ParallelStateInstance(None)
            handle._state = state
        return handle


def get_parallel_state(name: str | None = None) -> ParallelStateInstance:
    """The instance named ``name``, or the current one (:func:`get_current_parallel_state`) when ``None``."""
    return get_current_parallel_state() if name is None else get_parallel_state_instance(name)


def _state(name: str | None) -> ParallelState:
    return get_parallel_state(name).state


def is_initialized(name: str | None = None) -> bool:
    """Whether the named (or current) instance is initialised."""
    return get_parallel_state(name).is_initialized()


def set_tensor_model_parallel_world_size(world_size: int, name: str | None = None) -> None:
    """Override what ``get_tensor_model_parallel_world_size`` (and the model-parallel one) answers for the state."""
    _TP_OVERRIDES.setdefault(_state(name), {})["world_size"] = world_size


def set_tensor_model_parallel_rank(rank: int, name: str | None = None) -> None:
    """Override what ``get_tensor_model_parallel_rank`` (and the model-parallel one) answers for the state."""
    _TP_OVERRIDES.setdefault(_state(name), {})["rank"] = rank


def initialize_all_to_all_groups(name: str | None = None) -> dict[str, Any]:
    """The state's ZeRO++ all-to-all groups by DeepSpeed's keys (``local_<node>``, ``global_<local rank>``)."""
    return get_parallel_state(name).initialize_all_to_all_groups()


def get_all_to_all_groups(name: str | None = None) -> dict[str, Any]:
    """Same as :func:`initialize_all_to_all_groups`."""
    return initialize_all_to_all_groups(name)


def _get_local_all_to_all_group(name: str | None = None) -> dict[str, Any]:
    """``groups._get_local_all_to_all_group``'s spelling of :func:`get_all_to_all_groups`."""
    return initialize_all_to_all_groups(name)


from scoped_parallel.compat._wrapper_getters import GETTERS, initialize_parallel_state_from_config  # noqa: E402

globals().update(GETTERS)
__all__ += sorted(GETTERS)
