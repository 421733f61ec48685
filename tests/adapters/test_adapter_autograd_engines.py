"""autograd adapter around DeepSpeed engines: ``engine.backward`` carries its state.

4-rank gloo world. On every rank an actor engine (state A: TP=2 x DP=2) is built in
A's scope for ZeRO-2 and ZeRO-3; its ``engine.backward`` is held inside the backward
(a tensor hook, or the recompute of a checkpointed block) while threads hold the
critic's (B: DP=4) and the reference's (C: SP=2) scopes, and a fresh thread with no
scope reads ``current_state()``, the patched DeepSpeed getter
``groups._get_data_parallel_group()`` and the patched Megatron getters. Without the
``autograd`` adapter the read raises ``AmbiguousStateError``; with it, it returns A's
groups; after the backward it is ambiguous again.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn as nn
import torch.utils.checkpoint as ckpt

pytest.importorskip("deepspeed")
pytest.importorskip("megatron.core.parallel_state")


import _adapter_deepspeed_support as support  # noqa: E402
from _adapter_deepspeed_support import WORLD_TIMEOUT  # noqa: E402
from _backward_scenario import catch, holding, read_during  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore"), pytest.mark.world]


class _PausingNet(nn.Module):
    """Linear -> checkpointed (Tanh, Linear); pauses in a hook or in the block's recompute."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(7)
        self.first = nn.Linear(8, 16)
        self.block = nn.Sequential(nn.Tanh(), nn.Linear(16, 1))
        self.pause: Any = None
        self.where = "hook"
        self.block_calls = 0

    def _block(self, h: torch.Tensor) -> torch.Tensor:
        self.block_calls += 1
        if self.where == "recompute" and self.block_calls == 2 and self.pause is not None:
            self.pause()
        return self.block(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.first(x)
        if self.where == "hook" and self.pause is not None:
            pause = self.pause
            h.register_hook(lambda g: (pause(), g)[1])
        self.block_calls = 0
        return ckpt.checkpoint(self._block, h, use_reentrant=False)


def _reader(groups: Any, ps: Any) -> Any:
    def read() -> Any:
        from scoped_parallel import current_state

        return (current_state().name, support.ranks(groups._get_data_parallel_group()),
                ps.get_data_parallel_world_size(), ps.get_tensor_model_parallel_world_size())

    return read


def _describe(value: Any) -> Any:
    return f"{type(value).__name__}: {value}" if isinstance(value, BaseException) else value


def _rank_backward_scenario(rank: int, stage: int, where: str) -> dict[str, Any]:
    from megatron.core import parallel_state as ps

    from scoped_parallel import adapters

    out: dict[str, Any] = {}
    with support.isolated():
        import deepspeed.utils.groups as groups

        a = support.state(name="A", tensor_model_parallel_size=2)
        b = support.state(name="B")
        c = support.state(name="C", sequence_parallel_size=2)
        out["expected"] = ("A", a.ranks("dp"), a.size("dp"), a.size("tp"))
        read = _reader(groups, ps)
        try:
            for carrier in (False, True):
                targets = ("deepspeed", "megatron") + (("autograd",) if carrier else ())
                with adapters.installed(targets=targets):
                    net = _PausingNet()
                    with a.activate():
                        engine = support.engine(net, support.config(stage=stage), mpu=a)

                    def run(pause: Any) -> None:
                        net.pause, net.where = pause, where
                        try:
                            with a.activate():
                                loss = engine(support.batch(rank, 0, 1)).float().pow(2).mean()
                                engine.backward(loss)
                                engine.step()
                        finally:
                            net.pause = None

                    with holding(b, c):
                        during = read_during(run, read)
                        after = catch(read)
                    out[carrier] = {"during": _describe(during), "after": _describe(after),
                                    "block_calls": net.block_calls}
                    support.drop(engine)
        finally:
            support.destroy(a, b, c)
    return out


@pytest.mark.parametrize("where", ["hook", "recompute"])
@pytest.mark.parametrize("stage", [2, 3])
def test_engine_backward_carries_its_state_to_a_scopeless_thread(world, stage, where):
    """ZeRO-2/3 engine.backward (held in a hook or a checkpoint recompute): off ambiguous, on A's groups."""
    for rank, out in enumerate(world.run(_rank_backward_scenario, stage, where, timeout=WORLD_TIMEOUT)):
        expected = tuple(out["expected"])
        assert out[False]["block_calls"] == 2 and out[True]["block_calls"] == 2, f"rank {rank}: no recompute ran"
        off, on = out[False], out[True]
        assert str(off["during"]).startswith("AmbiguousStateError"), (
            f"rank {rank}, carrier off: expected AmbiguousStateError during backward, got {off['during']!r}")
        assert tuple(on["during"]) == expected, (
            f"rank {rank}, carrier on: expected {expected} during backward, got {on['during']!r}")
        for carrier in (False, True):
            assert str(out[carrier]["after"]).startswith("AmbiguousStateError"), (
                f"rank {rank}, carrier {carrier}: expected AmbiguousStateError after backward, "
                f"got {out[carrier]['after']!r}")
