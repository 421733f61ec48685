"""The strict flag, as the adapters package exports it: thin re-exports of the scope's.

Patched functions resolve their state with :func:`scoped_parallel._scope.dispatching`
(hot paths) or :func:`scoped_parallel._scope.resolve` (cold paths), which read the
same flag.
"""

from __future__ import annotations

from scoped_parallel._scope import is_strict, set_strict

__all__ = ["is_strict", "set_strict"]
