"""Run by ``test_multinode.py`` under torchrun as 2 nodes x 2 processes: ZeRO++ groups per state.

Prints one ``RESULT <json>`` line per rank: the hpZ and all-to-all rank sets DeepSpeed
holds for two engines (critic DP=4, actor TP=2 x DP=2), and whether interleaved hpZ
training matched each engine trained alone, bitwise.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import _adapter_deepspeed_support as support  # noqa: E402


def main() -> None:
    ds = support._ds()
    rank = ds.comm.get_rank()
    zero = {"stage": 3, "zero_hpz_partition_size": 2, "zero_quantized_gradients": True}
    config = support.config(stage=3, zero_optimization=zero)
    out: dict = {"rank": rank, "local world size": int(os.environ["LOCAL_WORLD_SIZE"])}
    critic = support.state(name="critic")
    actor = support.state(name="actor", tensor_model_parallel_size=2)
    specs = (("critic", critic, 2, None), ("actor", actor, 1, actor))
    with support.installed():
        engines = {}
        for name, state, seed, mpu in specs:
            with state.activate():
                engines[name] = support.engine(support.model(seed), config, mpu=mpu)
            engine = engines[name]
            out[name] = {
                "hpz": sorted({support.ranks(p.ds_zero_param_process_group) for p in engine.module.parameters()}),
                "a2a": {k: support.ranks(g) for k, g in sorted(engine.local_all_to_all_group.items())},
            }
        support.drop(*engines.values())
        # Training: hpZ only (qgZ's quantized reduction has no CPU kernel).
        train_config = support.config(stage=3, zero_optimization={"stage": 3, "zero_hpz_partition_size": 2})
        alone = {}
        for name, state, seed, mpu in specs:
            with state.activate():
                engine = support.engine(support.model(seed), train_config, mpu=mpu)
                losses = [float(support.step(engine, support.batch(rank, i, seed))) for i in range(2)]
                alone[name] = (losses, support.full_params(engine))
            support.drop(engine)
        engines = {}
        for name, state, seed, mpu in specs:
            with state.activate():
                engines[name] = support.engine(support.model(seed), train_config, mpu=mpu)
        together = {name: [] for name, *_ in specs}
        for i in range(2):
            for name, state, seed, _ in specs:
                with state.activate():
                    together[name].append(float(support.step(engines[name], support.batch(rank, i, seed))))
        for name, state, *_ in specs:
            with state.activate():
                params = support.full_params(engines[name])
            out[name]["bit identical"] = together[name] == alone[name][0] and all(map(torch.equal, alone[name][1], params))
        support.drop(*engines.values())
    support.destroy(actor, critic)
    print("RESULT " + json.dumps(out), flush=True)
    ds.comm.destroy_process_group()


if __name__ == "__main__":
    main()
