"""Per-rank planning of tiled reshards (``scoped_parallel.resharding.tiled``), pure: every rank's part,
planned alone, fills every destination element of an N-d tensor split with Megatron's strided
tiles from the same source element exactly once, sends pair with receives, and the plan a
rank holds grows with its own transfers."""

from __future__ import annotations

import time

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from scoped_parallel.resharding.plan import box_slices
from scoped_parallel.resharding.tiled import Split, TiledTensor, pairing_holds, plan_tiled_local


def _copies(first: int, count: int, group: int) -> tuple[tuple[int, ...], ...]:
    ranks = list(range(first, first + count))
    return tuple(tuple(ranks[i: i + group]) for i in range(0, count, group))


def _piece(full: torch.Tensor, split: Split, members: int, index: int) -> torch.Tensor:
    """What member ``index`` of a copy of ``members`` holds of ``full`` (Megatron's tiles)."""
    if split.dim is None:
        return full.clone()
    length = full.shape[split.dim]
    tiles = []
    for k in range(split.stride):
        start = min((index + members * k) * split.part, length)
        tiles.append(full.narrow(split.dim, start, min(start + split.part, length) - start))
    return torch.cat(tiles, dim=split.dim)


def _run(tensor, src, dst, ranks):
    """Every rank's part planned alone, applied by hand: returns {rank: filled destination}
    and the plans; checks each transfer is in both ends' parts and the pairing sums."""
    parts = {r: plan_tiled_local(r, [tensor], src, dst) for r in ranks}
    full = torch.arange(torch.Size(tensor.shape).numel(), dtype=torch.float64).reshape(tensor.shape)
    held, filled, counts = {}, {}, {}
    for key, copies, split, out in ((tensor.src, src, tensor.src_split, held), (tensor.dst, dst, tensor.dst_split, filled)):
        for group in copies[key]:
            for i, r in enumerate(group):
                out[r] = _piece(full, split, len(group), i)
    for r in filled:
        counts[r] = torch.zeros_like(filled[r])
        filled[r].fill_(-1)
    sums = [0, 0, 0, 0]
    for r, part in parts.items():
        assert part.problems() == [], f"rank {r}: {part.problems()}"
        sums = [a + b for a, b in zip(sums, part.pairing)]
        for x in part.transfers:
            if x.dst_rank != r:
                continue
            if not x.local:
                assert x in parts[x.src_rank].transfers, f"rank {r} receives {x}, which rank {x.src_rank} does not send"
            filled[r][box_slices(x.dst_box)] = held[x.src_rank][box_slices(x.src_box)]
            counts[r][box_slices(x.dst_box)] += 1
    received = {r: f.clone() for r, f in filled.items()}  # what each rank holds after its receives
    for r, part in parts.items():
        for g in part.gathers:
            flat, count = filled[r].view(-1), counts[r].view(-1)
            for i, peer in enumerate(g.group):
                a, b = g.span(i)
                if g.relay and peer == r:
                    continue  # received point-to-point above
                flat[a:b] = received[peer].reshape(-1)[a:b] if g.relay else held[peer].reshape(-1)[: b - a]
                count[a:b] += 1
    for r, part in parts.items():
        for x in part.transfers:
            if x.src_rank == r and not x.local:
                assert x in parts[x.dst_rank].transfers, f"rank {r} sends {x}, which rank {x.dst_rank} does not receive"
    assert pairing_holds(sums), f"pairing sums {sums} do not balance"
    return filled, counts, full, parts


def _expected(full, split, members, index):
    return _piece(full, split, members, index)


sides = st.tuples(
    st.integers(0, 4), st.integers(1, 8),     # first rank, rank count
    st.integers(1, 4),                        # ranks per copy (1: whole per rank)
    st.integers(1, 2),                        # stride
    st.booleans(),                            # split (False: whole on every member)
)


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 3), st.integers(0, 1), sides, sides)
def test_every_destination_element_comes_from_the_same_source_element_exactly_once(unit, dim, src_side, dst_side):
    splits, copies = [], []
    for first, count, group, stride, split in (src_side, dst_side):
        group = min(group, count)
        count -= count % group
        copies.append(_copies(first, count, group))
        splits.append((group, stride, split and group > 1))
    # a length every side's tiles divide: Megatron requires it
    (sg, ss, s_split), (dg, ds, d_split) = splits
    length = unit * sg * ss * dg * ds
    shape = (length, 3) if dim == 0 else (2, length)
    src_split = Split(dim, length // (sg * ss), ss) if s_split else Split()
    dst_split = Split(dim, length // (dg * ds), ds) if d_split else Split()
    if not s_split:
        copies[0] = tuple((r,) for group in copies[0] for r in group)
    if not d_split:
        copies[1] = tuple((r,) for group in copies[1] for r in group)
    tensor = TiledTensor("w", shape, 8, "torch.float64", "s", src_split, "d", dst_split)
    src, dst = {"s": copies[0]}, {"d": copies[1]}
    ranks = sorted({r for g in copies[0] + copies[1] for r in g})
    filled, counts, full, _ = _run(tensor, src, dst, ranks)
    for group in copies[1]:
        for i, r in enumerate(group):
            want = _expected(full, dst_split, len(group), i)
            assert torch.equal(counts[r], torch.ones_like(counts[r])), f"rank {r}: written {counts[r].tolist()} times"
            assert torch.equal(filled[r], want), f"rank {r}: expected {want.tolist()}, got {filled[r].tolist()}"


def test_swiglu_stride_two_into_tp_four_keeps_gate_and_up_apart():
    """TP=2 -> TP=4 of a [gate; up] weight: each destination member holds gate tile i, then up tile i."""
    tensor = TiledTensor("fc1", (16, 2), 8, "torch.float64", "tp2", Split(0, 4, 2), "tp4", Split(0, 2, 2))
    filled, counts, full, _ = _run(tensor, {"tp2": ((0, 1), (2, 3))}, {"tp4": ((0, 1, 2, 3),)}, range(4))
    gate, up = full[:8], full[8:]
    for r in range(4):
        want = torch.cat([gate[2 * r: 2 * r + 2], up[2 * r: 2 * r + 2]])
        assert torch.equal(filled[r], want), f"rank {r}: expected {want.tolist()}, got {filled[r].tolist()}"


def test_column_parallel_into_replicas_on_its_own_ranks_is_one_gather():
    tensor = TiledTensor("w", (8, 2), 8, "torch.float64", "tp", Split(0, 4), "one", Split())
    filled, _, full, parts = _run(tensor, {"tp": ((0, 1),)}, {"one": ((0,), (1,))}, range(2))
    assert [len(p.gathers) for p in parts.values()] == [1, 1], "expected one gather per rank"
    assert all(not p.transfers for p in parts.values()), "expected no point-to-point transfer"
    assert all(torch.equal(filled[r], full) for r in range(2))


def test_replicas_on_other_ranks_are_relayed_one_message_per_source_rank():
    """A partition over ranks 0-3 into replicas on ranks 4-11: each source rank sends to one
    replica of each group of four (a relay), the groups all-gather; every replica whole."""
    tensor = TiledTensor("w", (16, 2), 8, "torch.float64", "dp", Split(0, 4), "one", Split())
    src, dst = {"dp": ((0, 1, 2, 3),)}, {"one": tuple((r,) for r in range(4, 12))}
    filled, counts, full, parts = _run(tensor, src, dst, range(12))
    assert [len(parts[r].transfers) for r in range(4)] == [2, 2, 2, 2], "expected one send per relay group per source rank"
    assert all(len(parts[r].gathers) == 1 and parts[r].gathers[0].relay for r in range(4, 12))
    assert all(torch.equal(filled[r], full) for r in range(4, 12))


def test_a_row_parallel_weight_into_replicas_is_point_to_point():
    """dim 1 splits are not one flat run per member: no gather, and still right."""
    tensor = TiledTensor("w", (2, 8), 8, "torch.float64", "tp", Split(1, 4), "one", Split())
    filled, _, full, parts = _run(tensor, {"tp": ((0, 1),)}, {"one": ((0,), (1,))}, range(2))
    assert all(not p.gathers for p in parts.values())
    assert all(torch.equal(filled[r], full) for r in range(2))


def test_a_rank_part_grows_with_its_own_pieces_not_with_ranks_squared():
    """TP=8 x 128 copies -> TP=4 x 256 copies on the same 1,024 ranks, 50 tensors: rank 5's
    part holds only its own transfers, and planning it is as fast as at 64 ranks (within 4x)."""
    def part(world):
        src = {"tp8": _copies(0, world, 8)}
        dst = {"tp4": _copies(0, world, 4)}
        tensors = [TiledTensor(f"w{i}", (4096, 64), 2, "torch.bfloat16", "tp8", Split(0, 512), "tp4", Split(0, 1024))
                   for i in range(50)]
        start = time.perf_counter()
        plan = plan_tiled_local(5, tensors, src, dst)
        return plan, time.perf_counter() - start

    small, t_small = part(64)
    big, t_big = part(1024)
    assert len(big.transfers) == len(small.transfers), f"{len(small.transfers)} transfers at 64 ranks, {len(big.transfers)} at 1,024"
    assert t_big < 4 * t_small + 0.05, f"planning took {t_small:.4f} s at 64 ranks but {t_big:.4f} s at 1,024"
