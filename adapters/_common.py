"""What every adapter shares: the strict flag and the scope lookup used by patched getters."""

from __future__ import annotations

from typing import Any

from scoped_parallel._scope import _ACTIVE, _CURRENT, current_state_or_none
from scoped_parallel.errors import NoActiveStateError

__all__ = ["active_state", "set_strict", "is_strict"]

_STRICT = [False]


def set_strict(strict: bool) -> None:
    _STRICT[0] = bool(strict)


def is_strict() -> bool:
    return _STRICT[0]


def active_state(what: str) -> Any:
    """The state a patched getter should answer from, or None to fall through.

    Outside any scope the patched getter behaves exactly as the original, unless
    ``install(strict=True)`` was used, in which case this raises.
    """
    frame = _CURRENT.get()  # the common case, inlined: patched getters are hot
    if frame is not None:
        return frame[0]
    state = current_state_or_none() if _ACTIVE else None
    if state is None and _STRICT[0]:
        raise NoActiveStateError(
            f"{what} was called outside any scope while scoped_parallel adapters are installed "
            "in strict mode. Call it inside `with state.activate():` (or on an engine bound with "
            "state.bind(engine)), or install the adapters with strict=False to fall back to the "
            "library's own global state."
        )
    return state
