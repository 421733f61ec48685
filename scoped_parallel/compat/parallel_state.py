"""DeepSpeed PR #7726's ``deepspeed.utils.parallel_state`` names, backed by scoped_parallel.

The PR splits its API in two modules: ``parallel_state`` (the class and the rank math)
and ``parallel_state_wrappers`` (the named registry and module-level getters). Code that
imports from the first switches with one line, as for the second::

    # from deepspeed.utils.parallel_state import ParallelState, RankGenerator, get_parallel_state
    from scoped_parallel.compat.parallel_state import ParallelState, RankGenerator, get_parallel_state

* :class:`ParallelState` is :class:`scoped_parallel.compat.parallel_state_wrappers.ParallelState`
  (``ParallelState()``, then ``initialize_model_parallel(...)``).
* :func:`get_parallel_state` is the default instance, the one
  ``parallel_state_wrappers.get_parallel_state_instance(None)`` returns (as in the PR).
* :class:`RankGenerator` and :func:`generate_masked_orthogonal_rank_groups` give the PR's
  (Megatron's) rank lists, from the rank math of :mod:`scoped_parallel.layout`. Worked
  example on 8 ranks, ``tp=2, dp=2, pp=2``, order ``"tp-dp-pp"``::

      >>> RankGenerator(tp=2, ep=1, dp=2, pp=2, cp=1, sp=1, order="tp-dp-pp").get_ranks("dp")
      [[0, 2], [1, 3], [4, 6], [5, 7]]

  Unlike the PR's, a sequence-parallel size may be combined with TP, PP or EP (as in
  :class:`scoped_parallel.ParallelLayout`); bad sizes or orders raise
  :class:`~scoped_parallel.errors.LayoutError` naming the value (the PR: ``RuntimeError``
  or ``AssertionError``).

Not provided: ``GlobalMemoryBuffer``. It is Megatron's scratch-buffer class; with
:func:`scoped_parallel.adapters.install` Megatron's ``get_global_memory_buffer()`` already
answers one buffer per state, and a state built only for DeepSpeed has no use for one.
"""

from __future__ import annotations

import math
from typing import Sequence

from scoped_parallel.compat.parallel_state_wrappers import ParallelState, get_parallel_state_instance
from scoped_parallel.errors import LayoutError
from scoped_parallel.layout.checks import prefix_strides
from scoped_parallel.layout.grid import iter_masked_groups
from scoped_parallel.layout.kinds import token_problems

__all__ = ["ParallelState", "RankGenerator", "generate_masked_orthogonal_rank_groups", "get_parallel_state"]

#: the tokens a RankGenerator takes, in the PR's (keyword) order
_TOKENS = ("tp", "ep", "dp", "pp", "cp", "sp")


def get_parallel_state() -> ParallelState:
    """The default instance (``parallel_state_wrappers.get_parallel_state_instance(None)``)."""
    return get_parallel_state_instance(None)


def generate_masked_orthogonal_rank_groups(
    world_size: int, parallel_size: Sequence[int], mask: Sequence[bool]
) -> list[list[int]]:
    """Every group spanning the masked axes of a grid of ``parallel_size`` (first axis fastest).

    ``world_size`` must be the product of ``parallel_size``; ``mask[i]`` says whether axis
    ``i`` belongs to the group. ``(8, [2, 2, 2], [False, True, False])`` gives
    ``[[0, 2], [1, 3], [4, 6], [5, 7]]``.
    """
    sizes = tuple(int(s) for s in parallel_size)
    if len(mask) != len(sizes):
        raise LayoutError(f"mask {list(mask)} must have one entry per size in {list(sizes)}")
    if any(s < 1 for s in sizes):
        raise LayoutError(f"every parallel size must be at least 1, got {list(sizes)}")
    product = math.prod(sizes)
    if product != world_size:
        raise LayoutError(
            f"world_size {world_size} is not the product of parallel_size {list(sizes)} ({product}); "
            "pass the sizes of every axis"
        )
    masked = tuple(i for i, m in enumerate(mask) if m)
    return [list(group) for group in iter_masked_groups(sizes, prefix_strides(sizes), masked)]


class RankGenerator:
    """The PR's (Megatron's) rank generator: ``get_ranks("tp-dp")`` lists every such group.

    Sizes not named in ``order`` must be 1 (they are appended); ``ep`` and ``cp`` cannot
    both exceed 1 in one generator (Megatron builds one generator for dense layers and
    one for expert layers).
    """

    def __init__(self, tp: int, ep: int, dp: int, pp: int, cp: int, sp: int, order: str, rank_offset: int = 0) -> None:
        sizes = dict(zip(_TOKENS, (tp, ep, dp, pp, cp, sp)))
        for token, size in sizes.items():
            if isinstance(size, bool) or not isinstance(size, int) or size < 1:
                raise LayoutError(f"RankGenerator {token}={size!r}: every size must be an int >= 1")
        if ep > 1 and cp > 1:
            raise LayoutError(
                f"RankGenerator with ep={ep} and cp={cp}: one generator takes expert or context "
                "parallelism, not both; build one for the dense layers (cp) and one for the experts (ep)"
            )
        if not isinstance(rank_offset, int) or rank_offset < 0:
            raise LayoutError(f"rank_offset must be an int >= 0, got {rank_offset!r}")
        given = [t for t in str(order).lower().split("-") if t]
        bad, repeated = token_problems(tuple(given), _TOKENS)
        if bad is not None or repeated:
            raise LayoutError(
                f"order {order!r} must name each of {'-'.join(_TOKENS)} at most once; got {given}"
            )
        missing = [t for t in _TOKENS if t not in given and sizes[t] != 1]
        if missing:
            raise LayoutError(f"order {order!r} must name {missing} (their sizes are not 1)")
        self.tp, self.ep, self.dp, self.pp, self.cp, self.sp = tp, ep, dp, pp, cp, sp
        self.rank_offset = rank_offset
        self.order = "-".join(given + [t for t in _TOKENS if t not in given])
        self.name_to_size = sizes
        self.ordered_size = [sizes[t] for t in self.order.split("-")]
        self.world_size = math.prod(self.ordered_size)

    def get_mask(self, order: str, token: str) -> list[bool]:
        """Which axes of ``order`` the kind ``token`` (e.g. ``"tp-dp"``) spans."""
        axes = order.split("-")
        wanted = token.lower().split("-")
        bad = [t for t in wanted if t not in axes]
        if bad:
            raise LayoutError(f"token {token!r} names {bad}, which order {order!r} lacks")
        return [axis in wanted for axis in axes]

    def get_ranks(self, token: str) -> list[list[int]]:
        """Every group of kind ``token`` (global ranks, ``rank_offset`` added)."""
        groups = generate_masked_orthogonal_rank_groups(
            self.world_size, self.ordered_size, self.get_mask(self.order, token)
        )
        return [[rank + self.rank_offset for rank in group] for group in groups]

    def __repr__(self) -> str:
        sizes = ", ".join(f"{t}={self.name_to_size[t]}" for t in _TOKENS)
        return f"RankGenerator({sizes}, order={self.order!r}, rank_offset={self.rank_offset})"
