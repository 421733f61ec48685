"""Drop-in replacements for other libraries' parallel-state APIs, backed by :class:`~scoped_parallel.ParallelState`.

* :mod:`scoped_parallel.compat.parallel_state_wrappers`: the module DeepSpeed PR #7726
  proposes as ``deepspeed.utils.parallel_state_wrappers``, with contextvar scoping.
* :mod:`scoped_parallel.compat.parallel_state`: its ``deepspeed.utils.parallel_state``
  (``ParallelState``, ``get_parallel_state``, ``RankGenerator``).
"""
