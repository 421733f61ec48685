"""What a rank must create for a state, under which names, and the check before it.

Planning is separate from creating so that it can be tested with no process
group held (and under torch's fake backend at any world size):

* ``construction_tag`` numbers the states each process constructs over a
  rank range, so that the k-th state of one rank meets the k-th state of its
  peers in the agreement check and in group names;
* ``StateSpec`` is everything that decides which groups a rank creates or
  shares; its ``StateSpec.fingerprint`` is what peers compare;
* ``plan_requests`` lists the rank's group requests in the one global order
  every rank uses, each named by the agreed tag;
* ``agree_with_peers`` runs ``scoped_parallel.groups.agree.agree`` over the
  default store before any group exists.

Worked example: on 8 ranks, rank 5 of ``ParallelState(tensor_model_parallel_size=2,
pipeline_model_parallel_size=2)`` plans 16 requests (one per kind it belongs to,
e.g. ``tp`` -> ranks (4, 5), ``dp`` -> (5, 7), ``pp`` -> (1, 5)), ordered by size
then ranks; equal rank sets get distinct tags ``<tag>/0``, ``<tag>/1``.
"""

from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Callable, Collection, Mapping

from scoped_parallel.groups.agree import agree
from scoped_parallel.groups.create import GroupRequest
from scoped_parallel.layout import ParallelLayout

__all__ = [
    "GLOO_TWIN_KINDS",
    "StateSpec",
    "agree_with_peers",
    "construction_tag",
    "plan_requests",
    "reset_construction_count",
]

#: Kinds that get a gloo twin with ``create_gloo_process_groups=True`` (Megatron's CPU-side groups).
GLOO_TWIN_KINDS = ("dp", "dp-cp", "edp")


class _Constructions:
    """Per (rank_offset, world_size): how many states this process constructed over that range."""

    def __init__(self) -> None:
        self.epoch = "0"
        self.count: dict[tuple[int, int], int] = {}
        self.lock = threading.Lock()


_CONSTRUCTIONS = _Constructions()


def reset_construction_count(epoch: str) -> None:
    """Start a new numbering of state constructions (every rank must call it alike).

    After a failed construction the ranks' counts may differ; a test harness (or a
    job that recovers from such a failure) calls this on every rank with a new,
    shared ``epoch`` so that old agreement keys and group names are never reused.
    """
    with _CONSTRUCTIONS.lock:
        _CONSTRUCTIONS.count.clear()
        _CONSTRUCTIONS.epoch = str(epoch)


def construction_tag(layout: ParallelLayout, span: tuple[int, int] | None = None) -> str:
    """Take the next construction number over the layout's ranks (or ``span``); return its tag.

    ``span`` is ``(first rank, number of ranks)`` of everyone taking part: the whole world
    when groups are created by splitting (every rank of the world joins every split).
    """
    if span is None:
        span = (layout.rank_offset, layout.world_size)
    with _CONSTRUCTIONS.lock:
        seq = _CONSTRUCTIONS.count.get(span, 0)
        _CONSTRUCTIONS.count[span] = seq + 1
        return f"{_CONSTRUCTIONS.epoch}/{span[0]}+{span[1]}/{seq}"


@dataclass(frozen=True)
class StateSpec:
    """Everything that decides which groups a rank of a state creates or shares."""

    layout: ParallelLayout
    name: str | None = None
    backend: str | None = None
    timeout: timedelta | None = None
    share: bool = True
    backends: Mapping[str, str] = field(default_factory=dict)
    options: Mapping[str, Any] = field(default_factory=dict)
    gloo_twins: bool = False
    #: fingerprint of the Megatron optional-group options (scoped_parallel.layout.optional)
    optional: str = ""

    def fingerprint(self) -> str:
        """What every peer must have alike, as text."""
        backends = ",".join(f"{k}={v}" for k, v in sorted(self.backends.items()))
        # Options objects differ per process; what must agree is their type and which kinds
        # share one object (that decides sharing).
        first: dict[int, str] = {}
        options = ",".join(
            f"{k}={type(v).__name__}@{first.setdefault(id(v), k)}" for k, v in sorted(self.options.items())
        )
        return (
            f"name={self.name!r};{self.layout.fingerprint()};backend={self.backend};"
            f"backends={backends};options={options};timeout={self.timeout};"
            f"gloo_twins={self.gloo_twins};share={self.share};{self.optional}"
        )


def plan_requests(
    spec: StateSpec, ranks_of: Mapping[str, tuple[int, ...]], tag: str, skip: Collection[str] = ()
) -> list[tuple[str, GroupRequest]]:
    """The rank's requests as ``(slot, request)``, in the global creation order, named by ``tag``.

    ``slot`` is the kind, or ``"gloo:<kind>"`` for a gloo twin; kinds in ``skip`` (made by
    splitting) are left out.
    """
    label = spec.name or "state"
    out: list[tuple[str, GroupRequest]] = []
    for kind, ranks in ranks_of.items():
        if kind in skip:
            continue
        request = GroupRequest(
            ranks=ranks,
            backend=spec.backends.get(kind, spec.backend),
            options=spec.options.get(kind),
            timeout=spec.timeout,
            desc=f"{label}:{kind}",
        )
        out.append((kind, request))
    if spec.gloo_twins:
        # Megatron also builds gloo twins of the partial (intra-instance) dp-cp and edp groups.
        for kind in GLOO_TWIN_KINDS + tuple(k for k in ("intra-dp-cp", "intra-edp") if k in ranks_of):
            request = GroupRequest(
                ranks=ranks_of[kind], backend="gloo", timeout=spec.timeout, desc=f"{label}:{kind}:gloo"
            )
            out.append(("gloo:" + kind, request))
    # One global order shared by all ranks: no circular waits between overlapping groups.
    out.sort(key=lambda item: item[1].order_key())
    # Name each creation from what all its members agree on (see _groups).
    seen: dict[tuple[int, ...], int] = {}
    for i, (slot, request) in enumerate(out):
        n = seen[request.ranks] = seen.get(request.ranks, -1) + 1
        out[i] = (slot, dataclasses.replace(request, tag=f"{tag}/{n}"))
    return out


def agree_with_peers(
    spec: StateSpec,
    rank: int,
    ranks_of: Mapping[str, tuple[int, ...]],
    tag: str,
    store: Any,
    timeout: timedelta,
    describe: Callable[[], str],
    span_size: int | None = None,
) -> None:
    """Check, before any group is created, that every peer built the same state.

    One leader per group reads its members' fingerprints and one decision covers the
    whole state (``span_size`` ranks: the world when groups are split): a rank that
    disagrees, or never arrives within ``timeout``, makes every rank of the state raise :class:`~scoped_parallel.errors.StateMismatchError` instead
    of hanging inside group creation.
    """
    layout = spec.layout
    last = layout.rank_offset + layout.world_size - 1
    where = f"construction {tag} over ranks {layout.rank_offset}..{last}"
    agree(
        store,
        f"scoped_parallel/agree/{tag}/",
        rank,
        layout.world_size if span_size is None else span_size,
        ranks_of.values(),
        spec.fingerprint(),
        timeout.total_seconds(),
        lambda: f"{describe()} ({where})",
    )
