"""``StateStore``: everything a state keeps beside its groups, in one place.

Three kinds of per-state data, each with one owner and one way in:

* **records** of the adapters (and compat, and reshard), by owner name:
  ``store.record(owner, factory, state)`` makes ``factory(state)`` once and returns the
  same object after (``ParallelState.adapter_record`` is its public spelling);
* **overrides**, the values Megatron's setters write (``set_tensor_model_parallel_world_size``
  and friends), one dict per state under the keys of
  :data:`scoped_parallel.getters.table.SETTERS`; the getters read ``store.overrides``;
* the **memo** of :func:`scoped_parallel.dispatch.dispatching`: answers of argument-free
  patched readers, dropped whenever an override changes or an adapter calls
  :func:`~scoped_parallel.dispatch.forget_memo`.

:meth:`StateStore.close` (``ParallelState.destroy``) calls each record's
``state_destroyed(state)`` hook and forgets everything, so nothing derived from a
destroyed state's groups outlives them.

Worked example::

    store.set_override("tp_size", 4)        # memo dropped: answers may depend on it
    store.overrides.get("tp_size")          # 4, what the getters read first
    store.record("deepspeed", Record, state) is store.record("deepspeed", Record, state)  # True
"""

from __future__ import annotations

from typing import Any, Callable

from scoped_parallel.errors import GroupNotAvailableError
from scoped_parallel.getters.table import OVERRIDE_KEYS

__all__ = ["StateStore"]


class StateStore:
    """One state's adapter records, Megatron override values and memoized answers (see the module doc)."""

    __slots__ = ("records", "overrides", "memo", "closed", "_describe")

    def __init__(self, describe: Callable[[], str]) -> None:
        #: per-state data of the adapters, by owner (see :meth:`record`)
        self.records: dict[str, Any] = {}
        #: values set with Megatron's setters in this state's scope (see :meth:`set_override`)
        self.overrides: dict[str, Any] = {}
        #: answers memoized by ``scoped_parallel.dispatch.dispatching(memoize=True)``
        self.memo: dict[Any, Any] = {}
        #: set by :meth:`close` (the state was destroyed): no record can be added
        self.closed = False
        self._describe = describe

    def record(self, owner: str, factory: Callable[[Any], Any], state: Any) -> Any:
        """The record of ``owner``: ``factory(state)`` on first use, then the same object."""
        try:
            return self.records[owner]
        except KeyError:
            if self.closed:
                raise GroupNotAvailableError(
                    f"{self._describe()} was destroyed; adapter {owner!r} cannot keep data for it"
                ) from None
            record = self.records[owner] = factory(state)
            return record

    def set_override(self, key: str, value: Any) -> None:
        """Set (``None``: clear) the override ``key``; memoized answers are dropped."""
        _check_key(key)
        if self.closed:
            raise GroupNotAvailableError(
                f"{self._describe()} was destroyed; Megatron's setter for {key!r} has no state to write to"
            )
        if value is None:
            self.overrides.pop(key, None)
        else:
            self.overrides[key] = value
        self.memo.clear()  # memoized getter answers may depend on it

    def override(self, key: str) -> Any:
        """The value set for ``key``, or ``None``."""
        _check_key(key)
        return self.overrides.get(key)

    def close(self, state: Any) -> None:
        """Call every record's ``state_destroyed(state)`` hook, then forget everything (the
        override values too: a destroyed state answers no getter, overridden or not)."""
        self.closed = True
        for record in list(self.records.values()):  # e.g. a reshard plan cache shared with another state
            # looked up on the type: a record may answer attribute reads itself (compat's
            # handle raises its own error for any name once its state is destroyed)
            hook = getattr(type(record), "state_destroyed", None)
            if hook is not None:
                hook(record, state)
        self.records.clear()
        self.overrides.clear()
        self.memo.clear()


def _check_key(key: str) -> None:
    if key not in OVERRIDE_KEYS:
        raise ValueError(f"unknown override key {key!r}; the keys are {sorted(OVERRIDE_KEYS)}")
