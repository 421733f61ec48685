"""Reshard megatron-core models between two states: each rank plans its own part.

``scoped_parallel.reshard(actor, actor_state, rollout, rollout_state)`` with megatron-core
models (``GPTModel`` and friends, one module or a list of virtual-pipeline chunks, bare or
wrapped in DDP / ``Float16Module``) lands here, on one of two backends:

* ``"megatron"`` (the default, every megatron-core version): **each rank plans its own
  part** (:func:`scoped_parallel.resharding.tiled.plan_tiled_local`). Each side is described
  compactly, per tensor a :class:`~scoped_parallel.resharding.staged.TensorRow` (canonical name, global shape, dtype, TP or
  expert-TP split with its partition stride, or whole; the expert slot), broadcast once from
  one rank per pipeline stage and expert slot (:mod:`scoped_parallel.resharding.staged`); every rank
  compares its own tensors with that description, and derives each tensor's holders (the
  TP groups, expert-TP groups or ranks of the stages holding it) from the state's layout
  alone. Planning time and memory grow with the rank's own pieces and the number of
  tensors, never with ranks squared; no rank holds another's transfers. The states may lie
  on other, partial or overlapping rank sets of the world (an actor on ranks 0-7 and a
  rollout copy on 8-11): only their ranks call, every collective runs over them. A tensor
  split on its first dimension into replicas on the same ranks is one all-gather per bucket.
* ``"megatron-core"`` (``backend="megatron-core"``): megatron-core's own planner
  (``megatron.core.resharding``: ``build_local_reshard_plan`` where it exists, 0.19+, else
  ``build_centralized_reshard_plan``, 0.16-0.18), its ops gathered on every rank and
  checked as one global plan (both states on the whole world). With ``service=`` (a
  megatron-core ``CopyService`` or a backend name such as ``"nccl"``) megatron-core's own
  ``execute_reshard_plan`` runs it.

What both add around the plan:

* **models built in a scope need no groups.** A model that carries its own
  ``pg_collection`` must have been built with the state's groups (else a
  :class:`~scoped_parallel.errors.ReshardError`: the wrong state was passed).
* **canonical names.** Every chunk's tensors under one name each (global layer number from
  ``layer_number``, global expert number from the MoE layer's ``local_expert_indices``, a
  tied output weight under the word embedding's name), so PP x VPP matches PP=1 or any
  other split (megatron-core's own planner plans one chunk: ``model[0]``).
* **SwiGLU.** ``linear_fc1`` of a gated MLP holds ``[gate, up]`` per TP rank: partition
  stride 2. megatron-core sets that on the parameter from 0.19 on; for older versions the
  description says so (the model is not changed).
* **expert tensors** are recognised by name (:func:`is_expert`: a path component
  ``experts``) as well as by megatron-core's ``allreduce=False``, which megatron-core sets
  only under EP > 1: an EP=1 expert is split over the expert-TP group (its ``allreduce``
  is True like a dense tensor's), so the checks use the expert-TP size (TP=2 x EP=1 with
  expert TP=1 -> EP=2).
* **casts** (``reshard(..., dtype=)``): resolved per canonical name on the described
  dtypes; the sender converts.
* **errors before anything moves, on every rank.** Names, global shapes, dtypes and that
  the TP tiling divides are checked on data every rank holds, and all raise the same
  :class:`~scoped_parallel.errors.ReshardError`; a rank's own problems (a model built in
  another state, a tensor described otherwise than its stage's lead does) are agreed with
  one all-reduce.
* **no stale reads after ``optimizer.step()``.** Under megatron-core's DDP with
  ``overlap_param_gather=True`` the step updates only this rank's shard of the parameter
  buffer; the other shards arrive with the all-gathers the next forward's pre-hooks finish.
  Before reading (or writing) any weight, :func:`finish_param_gathers` finishes those
  gathers on the source, and waits for any in flight on the destination (see there).
* **execution** is :func:`scoped_parallel.resharding.execute.run_plan` (batched point-to-point,
  receives straight into contiguous destination slices, buckets of ``bucket_bytes``),
  because megatron-core 0.17+'s executor synchronises CUDA and 0.16's gloo service
  allocates a CUDA stream.

The package, one module per job: ``names``
(canonical names, this rank's description), ``checks``
(what is checked and finished before anything moves),
``local`` (the ``"megatron"`` backend) and
``core`` (the ``"megatron-core"`` backend).
"""

from __future__ import annotations

from scoped_parallel.adapters.megatron_reshard.checks import finish_param_gathers
from scoped_parallel.adapters.megatron_reshard.core import MegatronCoreBackend
from scoped_parallel.adapters.megatron_reshard.local import MegatronBackend
from scoped_parallel.adapters.megatron_reshard.names import canonical_tensors, is_expert
from scoped_parallel.resharding import register_backend

__all__ = ["MegatronBackend", "MegatronCoreBackend", "canonical_tensors", "finish_param_gathers", "is_expert"]

register_backend(MegatronBackend())
register_backend(MegatronCoreBackend())
