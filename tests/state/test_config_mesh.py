"""ParallelState.from_config (sizes from DeepSpeed configs) and the DeviceMesh view.

Tier 1 (no torch.distributed): explicit arguments beat config keys beat defaults, nested
DeepSpeed keys are read, contradictory or bad values raise naming the key, configs load
from a JSON path or a DeepSpeedConfig object. Tier 4 (gloo world): from_config builds
the configured layouts and device_mesh() reuses the state's groups without creating any.
"""

from __future__ import annotations

import json
from datetime import timedelta

import pytest

from scoped_parallel import LayoutError
from scoped_parallel.layout.config import load_config, sizes_from_config


def test_explicit_arguments_beat_config_beat_defaults():
    """Overrides win over config keys; absent sizes stay absent (defaults apply)."""
    cfg = {"sequence_parallel_size": 2, "tensor_parallel": {"autotp_size": 2}}
    got = sizes_from_config(cfg, {"tensor_model_parallel_size": 1, "name": "x"})
    assert got == {"tensor_model_parallel_size": 1, "sequence_parallel_size": 2, "name": "x"}


def test_nested_deepspeed_keys_are_read():
    """tensor_parallel.autotp_size and a scoped_parallel section give sizes."""
    cfg = {"tensor_parallel": {"autotp_size": 4}, "scoped_parallel": {"order": "tp-pp-dp", "name": "critic"}}
    assert sizes_from_config(cfg, {}) == {"tensor_model_parallel_size": 4, "order": "tp-pp-dp", "name": "critic"}


def test_contradictory_keys_name_both():
    """Two config keys giving different sizes raise, naming both keys and values."""
    cfg = {"tensor_model_parallel_size": 2, "tensor_parallel": {"autotp_size": 4}}
    with pytest.raises(LayoutError, match=r"tensor_model_parallel_size=2, tensor_parallel.autotp_size=4"):
        sizes_from_config(cfg, {})


@pytest.mark.parametrize(
    "cfg,match",
    [
        ({"scoped_parallel": {"tp": 2}}, r"unknown key\(s\) \['tp'\]"),
        ({"sequence_parallel_size": "2"}, r"'sequence_parallel_size' must be an integer, got '2'"),
        ({"sequence_parallel_size": True}, r"must be an integer, got True"),
        ({"scoped_parallel": [1]}, r"'scoped_parallel' must be an object"),
    ],
)
def test_bad_config_values_name_the_key(cfg, match):
    """Unknown or mistyped keys raise LayoutError naming the key."""
    with pytest.raises(LayoutError, match=match):
        sizes_from_config(cfg, {})


def test_config_from_json_path_and_deepspeed_config_object(tmp_path):
    """A JSON file path and an object with _param_dict load like a dict."""
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"sequence_parallel_size": 2}))
    assert load_config(path) == {"sequence_parallel_size": 2}
    assert load_config(str(path)) == {"sequence_parallel_size": 2}

    class FakeDSConfig:
        _param_dict = {"sequence_parallel_size": 4}

    assert load_config(FakeDSConfig()) == {"sequence_parallel_size": 4}
    with pytest.raises(LayoutError, match="does not exist"):
        load_config(tmp_path / "nope.json")
    with pytest.raises(TypeError, match="DeepSpeedConfig"):
        load_config(42)


def rank_from_config_and_mesh(rank):
    import torch
    import torch.distributed as dist

    from scoped_parallel import ParallelState
    from scoped_parallel.groups import create as _groups

    t = timedelta(seconds=20)
    actor = ParallelState.from_config(
        {"train_batch_size": 8, "tensor_parallel": {"autotp_size": 2}}, name="actor", timeout=t
    )
    ref = ParallelState.from_config({"sequence_parallel_size": 2}, name="ref", timeout=t)
    try:
        try:
            ParallelState.from_config({"data_parallel_size": 3}, name="bad", timeout=t)
        except LayoutError as err:
            bad = str(err)
        pg_before, made_before = len(dist.distributed_c10d._world.pg_map), _groups.creation_count()
        mesh = actor.device_mesh()
        ref_mesh = ref.device_mesh()
        out = {
            "actor_sizes": (actor.get_tensor_model_parallel_world_size(), actor.get_data_parallel_world_size()),
            "ref_sp": ref.get_sequence_parallel_world_size(),
            "bad": bad,
            "dims": mesh.mesh_dim_names,
            "mesh": mesh.mesh.tolist(),
            # whether each mesh dimension's group is the very group the state holds
            "mesh_group_is_state_group": {
                "actor tp": mesh.get_group("tp") is actor.group("tp"),
                "actor dp": mesh.get_group("dp") is actor.group("dp"),
                "ref sp": ref_mesh.get_group("sp") is ref.group("sp"),
            },
            "ref_dims": ref_mesh.mesh_dim_names,
            "new_groups": (len(dist.distributed_c10d._world.pg_map) - pg_before, _groups.creation_count() - made_before),
        }
        x = torch.tensor([float(rank)])
        dist.all_reduce(x, group=mesh.get_group("tp"))
        out["tp_sum"] = int(x.item())
        return out
    finally:
        actor.destroy()
        ref.destroy()


@pytest.mark.world
def test_from_config_and_device_mesh_on_a_real_world(world):
    """from_config builds the configured layouts; device_mesh reuses the state's groups (no new ones)."""
    res = world.run(rank_from_config_and_mesh)
    for r, out in enumerate(res):
        assert out["actor_sizes"] == (2, 2), f"rank {r}: actor (tp, dp) sizes {out['actor_sizes']}, expected (2, 2)"
        assert out["ref_sp"] == 2, f"rank {r}: ref sp size {out['ref_sp']}, expected 2"
        assert "'data_parallel_size' is 3" in out["bad"], f"rank {r}: error should name data_parallel_size 3: {out['bad']}"
        assert out["dims"] == ("dp", "tp"), f"rank {r}: actor mesh dims {out['dims']}, expected ('dp', 'tp')"
        assert out["mesh"] == [[0, 1], [2, 3]], f"rank {r}: actor mesh {out['mesh']}, expected [[0, 1], [2, 3]]"
        assert out["ref_dims"] == ("dp", "sp"), f"rank {r}: ref mesh dims {out['ref_dims']}, expected ('dp', 'sp')"
        other = [dim for dim, same in out["mesh_group_is_state_group"].items() if not same]
        assert other == [], f"rank {r}: mesh dimensions whose group is not the state's own: {other}"
        assert out["new_groups"] == (0, 0), (
            f"rank {r}: device_mesh() added (torch groups, library groups) {out['new_groups']}, expected (0, 0)"
        )
    sums = [out["tp_sum"] for out in res]
    assert sums == [1, 1, 5, 5], f"all-reduce over the mesh's tp groups by rank: {sums}, expected [1, 1, 5, 5]"
