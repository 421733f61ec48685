"""Command line: ``python -m scoped_parallel layout ...``.

Examples::

    python -m scoped_parallel layout --world-size 16 --tp 2 --pp 2
    python -m scoped_parallel layout --world-size 16 --tp 2 --pp 2 --rank 5
    python -m scoped_parallel layout --world-size 8 --sp 2 --json
    python -m scoped_parallel layout --world-size 4 --state actor:tp=2 --state critic:dp=4 --rank 1
    python -m scoped_parallel layout --world-size 4 --state actor:tp=2 --state ref:sp=2 --diff
    python -m scoped_parallel layout --world-size 8 --state actor:tp=2,pp=2 --svg layout.svg

Pure layout math: no process group is created and torch is not imported.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Callable, Sequence

from scoped_parallel.layout.axes import AXES
from scoped_parallel.errors import LayoutError
from scoped_parallel.layout.grid import DENSE_KINDS, EXPERT_KINDS, ParallelLayout

__all__ = ["main"]


def _int_at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
        return value

    return parse


_positive_int = _int_at_least(1)
_natural_int = _int_at_least(0)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m scoped_parallel", description="Inspect scoped_parallel layouts."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    lay = sub.add_parser("layout", help="print the process groups of a layout")
    lay.add_argument("--world-size", type=_positive_int, required=True)
    for axis in AXES:
        lay.add_argument(axis.cli_flag, type=_positive_int, default=axis.default, help=axis.help)
    lay.add_argument("--order", default="tp-cp-ep-dp-pp")
    lay.add_argument("--rank-offset", type=_natural_int, default=0)
    lay.add_argument("--rank", type=_natural_int, default=None, help="show one rank's groups")
    lay.add_argument("--json", action="store_true", help="machine-readable output")
    lay.add_argument(
        "--state",
        action="append",
        default=[],
        metavar="NAME:k=v,...",
        help=f"a named layout (keys {' '.join(a.token for a in AXES)} dp order offset ws); repeat for several",
    )
    lay.add_argument("--diff", action="store_true", help="compare the first two --state layouts")
    lay.add_argument("--svg", metavar="FILE", help="write a picture of each state's rank grid")
    return parser


def _layout(args: argparse.Namespace) -> ParallelLayout:
    sizes = {axis.keyword: getattr(args, axis.token) for axis in AXES}
    return ParallelLayout(args.world_size, order=args.order, rank_offset=args.rank_offset, **sizes)


def _rank_view(layout: ParallelLayout, rank: int) -> dict[str, object]:
    return {
        "rank": rank,
        "coordinates": layout.coordinates(rank),
        "groups": {k: list(v) for k, v in layout.groups_of(rank).items()},
    }


def _several(args: argparse.Namespace) -> int:
    from scoped_parallel.layout import report

    states = dict(report.parse_state_spec(spec, args.world_size) for spec in args.state)
    if args.svg:
        with open(args.svg, "w", encoding="utf-8") as fh:
            fh.write(report.svg(states))
        print(f"wrote {args.svg}")
    if args.json:
        doc: dict[str, object] = {"states": {n: lay.to_dict() for n, lay in states.items()}}
        if args.rank is not None:
            doc["rank"] = {
                n: _rank_view(lay, args.rank) for n, lay in states.items() if lay.contains(args.rank)
            }
            doc["shared"] = [
                {"ranks": list(r), "users": u}
                for r, u in report.shared_groups(states, args.rank).items()
            ]
        print(json.dumps(doc, indent=2, sort_keys=True))
        return 0
    if args.diff:
        if len(states) < 2:
            raise LayoutError("--diff needs two --state layouts")
        (a, la), (b, lb) = list(states.items())[:2]
        print(report.diff_report(a, la, b, lb))
    elif args.rank is not None:
        print(report.rank_report(states, args.rank))
    elif not args.svg:
        for name, lay in states.items():
            print(f"== {name}")
            print(lay.table())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.state:
        try:
            return _several(args)
        except (LayoutError, TypeError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
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
