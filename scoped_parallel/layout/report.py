"""Several layouts side by side: per-rank views, shared groups, diffs and an SVG picture.

Pure layout math, used by ``python -m scoped_parallel layout --state ...``.
Two states' groups are *physically shared* when they have the same rank set:
``ParallelState(share_groups=True)`` then builds one process group for both.
"""

from __future__ import annotations

import html
import math
from typing import Mapping, Sequence

from scoped_parallel.errors import LayoutError
from scoped_parallel.layout.axes import AXES
from scoped_parallel.layout.grid import DENSE_KINDS, EXPERT_KINDS, ParallelLayout

__all__ = ["parse_state_spec", "rank_report", "diff_report", "shared_groups", "svg"]

# --state spec key -> ParallelLayout keyword (the sizes come from the axis table)
_SPEC_KEYS = {axis.token: axis.keyword for axis in AXES}
_SPEC_KEYS.update({
    "offset": "rank_offset",
    "ws": "world_size",
    "order": "order",
    "dp": "dp",
})
_PALETTE = (
    "#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7",
    "#9c755f", "#bab0ac", "#86bcb6", "#d37295", "#a0cbe8", "#ffbe7d", "#8cd17d", "#f1ce63",
)


def parse_state_spec(spec: str, world_size: int) -> tuple[str, ParallelLayout]:
    """Parse ``name:tp=2,sp=1,dp=2`` into a named layout (``dp`` is checked, not set)."""
    name, sep, body = spec.partition(":")
    if not sep or not name:
        raise LayoutError(f"--state {spec!r}: expected NAME:key=value,... e.g. actor:tp=2,dp=2")
    kwargs: dict[str, object] = {"world_size": None}
    for item in filter(None, body.split(",")):
        key, eq, value = item.partition("=")
        if not eq or key not in _SPEC_KEYS:
            raise LayoutError(
                f"--state {spec!r}: bad item {item!r}; keys are {', '.join(sorted(_SPEC_KEYS))}"
            )
        if key == "order":
            kwargs["order"] = value
            continue
        try:
            kwargs[_SPEC_KEYS[key]] = int(value)
        except ValueError:
            raise LayoutError(f"--state {spec!r}: {key}={value!r} is not an integer") from None
    dp = kwargs.pop("dp", None)
    ws = kwargs.pop("world_size")
    if ws is None:  # like ParallelState: the rest of the world after the offset
        ws = world_size - int(kwargs.get("rank_offset", 0))  # type: ignore[call-overload]
    layout = ParallelLayout(ws, **kwargs)  # type: ignore[arg-type]
    if dp is not None and dp != layout.data_parallel_size:
        raise LayoutError(
            f"--state {spec!r}: dp={dp} but the other sizes give data parallel size "
            f"{layout.data_parallel_size} on {ws} ranks; drop dp= or fix the sizes"
        )
    return name, layout


def _kinds() -> tuple[str, ...]:
    return DENSE_KINDS + EXPERT_KINDS


def shared_groups(states: Mapping[str, ParallelLayout], rank: int) -> dict[tuple[int, ...], list[str]]:
    """Rank sets of size > 1 that ``rank`` holds in several states: who uses each.

    With ``share_groups=True`` (the default) each such rank set is one process group
    serving every listed user. On 4 ranks, an actor with TP=2 and a reference with
    SP=2 share rank 0's pair (0, 1):

    >>> from scoped_parallel import ParallelLayout
    >>> actor = ParallelLayout(4, tensor_model_parallel_size=2)
    >>> ref = ParallelLayout(4, sequence_parallel_size=2)
    >>> shared = shared_groups({"actor": actor, "ref": ref}, 0)
    >>> sorted(shared)
    [(0, 1), (0, 1, 2, 3), (0, 2)]
    >>> shared[(0, 1)][0], shared[(0, 1)][-1]
    ('actor.tp', 'ref.sp')
    """
    users: dict[tuple[int, ...], list[str]] = {}
    for name, layout in states.items():
        if not layout.contains(rank):
            continue
        for kind, ranks in layout.groups_of(rank).items():
            if len(ranks) > 1:
                users.setdefault(ranks, []).append(f"{name}.{kind}")
    return {r: u for r, u in users.items() if len({x.split('.')[0] for x in u}) > 1}


def rank_report(states: Mapping[str, ParallelLayout], rank: int) -> str:
    """One rank's coordinates and groups in every state, and which groups are shared."""
    lines = [f"rank {rank}"]
    for name, layout in states.items():
        if not layout.contains(rank):
            lines.append(f"  {name}: not a member (ranks {layout.ranks.start}..{layout.ranks.stop - 1})")
            continue
        coords = layout.coordinates(rank)
        lines.append(f"  {name}: {layout!r}")
        lines.append("    coordinates: " + " ".join(f"{k}={v}" for k, v in coords.items()))
        for kind, ranks in layout.groups_of(rank).items():
            if len(ranks) > 1:
                lines.append(f"    {kind:<10} {ranks}")
    shared = shared_groups(states, rank)
    lines.append("  physically shared (one process group with share_groups=True):")
    if not shared:
        lines.append("    none")
    for ranks, users in shared.items():
        lines.append(f"    {ranks}: {', '.join(users)}")
    return "\n".join(lines)


def diff_report(a_name: str, a: ParallelLayout, b_name: str, b: ParallelLayout) -> str:
    """Kind by kind: identical groups, or both sides' groups."""
    lines = [f"diff {a_name} {a!r} vs {b_name} {b!r}"]
    for kind in _kinds():
        ga, gb = a.groups(kind), b.groups(kind)
        if ga == gb:
            lines.append(f"  = {kind:<10} same {len(ga)} group(s) of {len(ga[0])}")
        else:
            lines.append(f"  ! {kind:<10} {a_name}: {_short(ga)}")
            lines.append(f"    {'':<10} {b_name}: {_short(gb)}")
    return "\n".join(lines)


def _short(groups: Sequence[tuple[int, ...]], limit: int = 6) -> str:
    text = " ".join(str(g) for g in groups[:limit])
    return text + (f" ... ({len(groups)} groups)" if len(groups) > limit else "")


def svg(states: Mapping[str, ParallelLayout], kinds: Sequence[str] = ("tp", "pp", "dp", "sp", "cp", "ep")) -> str:
    """An SVG of each state's rank grid, one panel per kind of size > 1, cells coloured by group."""
    cell, gap, pad = 28, 18, 14
    rows: list[tuple[str, ParallelLayout, list[str]]] = []
    for name, layout in states.items():
        shown = [k for k in kinds if len(layout.groups(k)[0]) > 1] or ["dp"]
        rows.append((name, layout, shown))
    world = max(layout.rank_offset + layout.world_size for _, layout, _ in rows)
    cols = min(world, 8) if world <= 64 else math.ceil(math.sqrt(world))
    grid_rows = math.ceil(world / cols)
    panel_w, panel_h = cols * cell, grid_rows * cell + 16
    titles = max(len(f"{n}: {lay!r}") for n, lay, _ in rows) * 8
    width = pad * 2 + max(max(len(s) for _, _, s in rows) * (panel_w + gap), titles)
    height = pad + len(rows) * (panel_h + 30 + gap)
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'font-family="monospace" font-size="10">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
    ]
    y = pad
    for name, layout, shown in rows:
        out.append(f'<text x="{pad}" y="{y + 12}" font-size="13" font-weight="bold">'
                   f'{html.escape(name)}: {html.escape(repr(layout))}</text>')
        y0 = y + 30
        for p, kind in enumerate(shown):
            x0 = pad + p * (panel_w + gap)
            out.append(f'<text x="{x0}" y="{y0 - 4}" font-size="11">{kind}</text>')
            colour_of = {}
            for index, group in enumerate(layout.groups(kind)):
                for r in group:
                    colour_of[r] = (_PALETTE[index % len(_PALETTE)], index, group)
            for r in range(world):
                cx, cy = x0 + (r % cols) * cell, y0 + (r // cols) * cell
                if r in colour_of:
                    colour, index, group = colour_of[r]
                    title = f"rank {r}: {kind} group {index} {group}"
                    out.append(
                        f'<g class="rank" data-state="{html.escape(name)}" data-kind="{kind}" data-rank="{r}" '
                        f'data-group="{index}"><title>{title}</title>'
                        f'<rect x="{cx}" y="{cy}" width="{cell - 2}" height="{cell - 2}" fill="{colour}"/>'
                        f'<text x="{cx + 4}" y="{cy + 17}" fill="white">{r}</text></g>'
                    )
                else:
                    out.append(
                        f'<rect x="{cx}" y="{cy}" width="{cell - 2}" height="{cell - 2}" fill="#eeeeee"/>'
                    )
        y += panel_h + 30 + gap
    out.append("</svg>")
    return "\n".join(out)
