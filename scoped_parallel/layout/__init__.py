"""Pure rank math: layouts, their axes and kinds, config reading and reports. No torch.

``ParallelLayout`` (:mod:`scoped_parallel.layout.grid`) is the rank numbering of one
parallel configuration, Megatron-exact. Around it, each module one job:
:mod:`~scoped_parallel.layout.axes` (the one table of dimensions),
:mod:`~scoped_parallel.layout.kinds` (group kinds), :mod:`~scoped_parallel.layout.checks`
(what a layout checks before it exists), :mod:`~scoped_parallel.layout.optional`
(Megatron's optional groups), :mod:`~scoped_parallel.layout.config` (sizes from a
DeepSpeed config), :mod:`~scoped_parallel.layout.report` (several layouts side by side)
and :mod:`~scoped_parallel.layout.cli` (``python -m scoped_parallel layout``).

Worked example on 8 ranks::

    >>> from scoped_parallel.layout import ParallelLayout
    >>> ParallelLayout(8, tensor_model_parallel_size=2).group_of(5, "dp")
    (1, 3, 5, 7)
"""

from __future__ import annotations

from scoped_parallel.layout.grid import (
    DENSE_AXES,
    DENSE_KINDS,
    EMBEDDING_KINDS,
    EXPERT_KINDS,
    ParallelLayout,
    canonical_kind,
)

__all__ = ["DENSE_AXES", "DENSE_KINDS", "EMBEDDING_KINDS", "EXPERT_KINDS", "ParallelLayout", "canonical_kind"]
