"""Command line: ``python -m scoped_parallel layout ...``.

Examples::

    python -m scoped_parallel layout --world-size 16 --tp 2 --pp 2
    python -m scoped_parallel layout --world-size 16 --tp 2 --pp 2 --rank 5
    python -m scoped_parallel layout --world-size 8 --sp 2 --json

Pure layout math: no process group is created and torch is not imported.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from scoped_parallel.errors import LayoutError
from scoped_parallel.layout import DENSE_KINDS, EXPERT_KINDS, ParallelLayout

__all__ = ["main"]


def _positive_int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m scoped_parallel", description="Inspect scoped_parallel layouts."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    lay = sub.add_parser("layout", help="print the process groups of a layout")
    lay.add_argument("--world-size", type=_positive_int, required=True)
    lay.add_argument("--tp", type=_positive_int, default=1, help="tensor model parallel size")
    lay.add_argument("--pp", type=_positive_int, default=1, help="pipeline model parallel size")
    lay.add_argument("--cp", type=_positive_int, default=1, help="context parallel size")
    lay.add_argument("--sp", type=_positive_int, default=1, help="Ulysses sequence parallel size")
    lay.add_argument("--ep", type=_positive_int, default=1, help="expert model parallel size")
    lay.add_argument("--etp", type=_positive_int, default=None, help="expert tensor parallel size")
    lay.add_argument("--order", default="tp-cp-ep-dp-pp")
    lay.add_argument("--rank-offset", type=_positive_int, default=0)
    lay.add_argument("--rank", type=_positive_int, default=None, help="show one rank's groups")
    lay.add_argument("--json", action="store_true", help="machine-readable output")
    return parser


def _layout(args: argparse.Namespace) -> ParallelLayout:
    return ParallelLayout(
        args.world_size,
        tensor_model_parallel_size=args.tp,
        pipeline_model_parallel_size=args.pp,
        context_parallel_size=args.cp,
        sequence_parallel_size=args.sp,
        expert_model_parallel_size=args.ep,
        expert_tensor_parallel_size=args.etp,
        order=args.order,
        rank_offset=args.rank_offset,
    )


def _rank_view(layout: ParallelLayout, rank: int) -> dict[str, object]:
    return {
        "rank": rank,
        "coordinates": layout.coordinates(rank),
        "groups": {k: list(v) for k, v in layout.groups_of(rank).items()},
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        layout = _layout(args)
        view = _rank_view(layout, args.rank) if args.rank is not None else None
    except (LayoutError, TypeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.json:
        doc: dict[str, object] = {"layout": layout.to_dict()}
        if view is not None:
            doc["rank"] = view
        else:
            doc["groups"] = {k: [list(g) for g in layout.groups(k)] for k in DENSE_KINDS + EXPERT_KINDS}
        print(json.dumps(doc, indent=2, sort_keys=True))
        return 0
    if view is None:
        print(layout.table())
        return 0
    print(repr(layout))
    coords = view["coordinates"]
    assert isinstance(coords, dict)
    print(f"rank {args.rank}: " + ", ".join(f"{k}={v}" for k, v in coords.items()))
    groups = view["groups"]
    assert isinstance(groups, dict)
    width = max(len(k) for k in groups)
    for kind, ranks in groups.items():
        print(f"  {kind:<{width}}  {tuple(ranks)}")
    return 0
