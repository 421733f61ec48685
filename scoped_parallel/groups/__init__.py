"""Everything that creates, shares and destroys a state's process groups.

One direction inside: :mod:`~scoped_parallel.groups.torch_compat` (every private torch
piece, checked once) <- :mod:`~scoped_parallel.groups.create` (the only place groups
are created or destroyed; sharing) <- :mod:`~scoped_parallel.groups.agree` /
:mod:`~scoped_parallel.groups.plan` (what a rank creates, checked with its peers
before any group exists) <- :mod:`~scoped_parallel.groups.split` (creation by
``split_group`` for a device-bound default group) <- :mod:`~scoped_parallel.groups.table`
(one table of every group a state holds, and ``scoped_parallel.groups.table.build``).
"""
