"""Adapters that re-point other libraries' global parallel state at the active scope.

This folder is installed as the ``scoped_parallel.adapters`` subpackage (never as a
top-level ``adapters`` package). Each target has its own module, imported lazily.
"""

from __future__ import annotations

__all__: list[str] = []
