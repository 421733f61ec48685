"""CPU glue for running DeepSpeed PR #7726's own test file in DeepSpeed's own harness.

Put this folder first on ``PYTHONPATH`` (``tests/compat/test_deepspeed_pr7726.py`` does): every
process of the harness (pytest, the forkserver, each rank) then runs this file at start-up.
It changes three things and nothing else:

* ``deepspeed.utils.parallel_state_wrappers`` and ``deepspeed.utils.parallel_state`` (the
  PR's modules, absent from released DeepSpeed) resolve to a replacement chosen by
  ``SP_PR_MODULES``: ``scoped`` (default) gives ``scoped_parallel.compat``'s modules;
  a path gives the PR's own files from that checkout (the baseline run).
* With ``SP_PR_ADAPTERS=1`` the first import of either module also calls
  :func:`scoped_parallel.adapters.install` (before the test builds any engine).
* ``from_pretrained`` of the one hub model the file names builds that architecture from a
  config with fixed weights (nothing may download here); both calls in a test get the
  same weights, as two loads of the same checkpoint would.
* ``torch.distributed.nn.functional.all_gather`` (the PR's Ulysses test gathers its loss
  with it) gets a backward that works on gloo. torch's own backward on gloo scatters
  from each *group* rank as if it were a global rank, so in a group without rank 0 it
  raises ``ValueError: Global rank 0 is not part of group`` (with the PR's own modules
  as well as ours; NCCL takes another path). The replacement computes the same gradient:
  the sum over the group of every rank's gradient for this rank's slot.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import os
import sys

_ALIASES = {
    "deepspeed.utils.parallel_state_wrappers": "scoped_parallel.compat.parallel_state_wrappers",
    "deepspeed.utils.parallel_state": "scoped_parallel.compat.parallel_state",
}
#: the hub model the PR's Ulysses test loads -> the sizes of that checkpoint's config
TINY_LLAMA = "hf-internal-testing/tiny-random-LlamaForCausalLM"
_TINY_LLAMA_SIZES = dict(
    hidden_size=16, intermediate_size=64, num_attention_heads=4, num_key_value_heads=4,
    num_hidden_layers=2, vocab_size=32000, max_position_embeddings=2048,
)
_DONE: list[bool] = []


def _once() -> None:
    if _DONE:
        return
    _DONE.append(True)
    if os.environ.get("SP_PR_ADAPTERS") == "1":
        from scoped_parallel import adapters

        adapters.install()
    if "transformers" in sys.modules:
        _offline_tiny_llama()
    _all_gather_backward_on_gloo()


def _all_gather_backward_on_gloo() -> None:
    import torch
    import torch.distributed as dist
    import torch.distributed.nn.functional as fn

    class _AllGather(torch.autograd.Function):
        @staticmethod
        def forward(ctx, group, tensor):
            ctx.group = group
            out = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
            dist.all_gather(out, tensor.contiguous(), group=group)
            return tuple(out)

        @staticmethod
        def backward(ctx, *grads):
            stacked = torch.stack([g if g is not None else torch.zeros(()) for g in grads])
            dist.all_reduce(stacked, group=ctx.group)
            return None, stacked[dist.get_rank(ctx.group)]

    original = fn.all_gather

    def all_gather(tensor, group=None):
        if dist.get_backend(group) != "gloo":
            return original(tensor, group=group)
        return _AllGather.apply(group if group is not None else dist.group.WORLD, tensor)

    fn.all_gather = all_gather


def _offline_tiny_llama() -> None:
    import torch
    import transformers

    def config_from_pretrained(original):
        def from_pretrained(name, *args, **kwargs):
            if name == TINY_LLAMA:
                return transformers.LlamaConfig(**_TINY_LLAMA_SIZES)
            return original(name, *args, **kwargs)

        return from_pretrained

    def model_from_pretrained(original):
        def from_pretrained(name, *args, **kwargs):
            if name != TINY_LLAMA:
                return original(name, *args, **kwargs)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(1234)
                return transformers.LlamaForCausalLM(transformers.LlamaConfig(**_TINY_LLAMA_SIZES))

        return from_pretrained

    transformers.AutoConfig.from_pretrained = config_from_pretrained(transformers.AutoConfig.from_pretrained)
    transformers.AutoModelForCausalLM.from_pretrained = model_from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained
    )


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if fullname not in _ALIASES:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        source = os.environ.get("SP_PR_MODULES", "scoped")
        if source == "scoped":
            module = importlib.import_module(_ALIASES[spec.name])
        else:  # the PR's own file from a checkout: an ordinary module under the PR's name
            path = os.path.join(source, *spec.name.split(".")) + ".py"
            own = importlib.util.spec_from_file_location(spec.name, path)
            module = importlib.util.module_from_spec(own)
            sys.modules[spec.name] = module
            own.loader.exec_module(module)
        self._spec = getattr(module, "__spec__", None)
        return module

    def exec_module(self, module):
        if self._spec is not None:
            module.__spec__ = self._spec
        _once()


sys.meta_path.insert(0, _Alias())
