"""Group kinds: their tokens, canonical spelling and parsing. Pure; no torch.

A kind names a process group by the axes it spans, e.g. ``"tp"`` or ``"dp-cp"``
(the ranks that agree on every other coordinate). Dense kinds combine tp, sp,
dp, cp, pp; expert kinds combine etp, ep, edp and optionally pp; ``embd`` and
``pos-embd`` are Megatron's embedding groups.
"""

from __future__ import annotations

from collections.abc import Collection
from functools import lru_cache

from scoped_parallel.errors import LayoutError
from scoped_parallel.layout.axes import DENSE_KIND_TOKENS, DENSE_ONLY_TOKENS, EXPERT_KIND_TOKENS, EXPERT_ONLY_TOKENS

__all__ = [
    "DENSE_KINDS",
    "EMBEDDING_KINDS",
    "EXPERT_KINDS",
    "canonical_kind",
    "normalise_kind",
    "parse_kind",
    "token_problems",
]

#: Dense group kinds a state builds by default (canonical spelling).
DENSE_KINDS: tuple[str, ...] = (
    "tp",
    "pp",
    "dp",
    "cp",
    "sp",
    "tp-pp",
    "dp-cp",
    "sp-dp",
    "tp-dp",
    "tp-cp",
    "tp-dp-cp",
)
#: Expert group kinds a state builds by default (canonical spelling).
EXPERT_KINDS: tuple[str, ...] = ("ep", "etp", "edp", "etp-ep", "etp-ep-pp")
#: Megatron's word-embedding and position-embedding groups.
EMBEDDING_KINDS: tuple[str, ...] = ("embd", "pos-embd")

# Other spellings accepted by ParallelState.group() and friends.
_ALIASES = {"mp": "tp-pp", "model": "tp-pp", "dp-with-cp": "dp-cp"}


def token_problems(tokens: tuple[str, ...], valid: Collection[str]) -> tuple[str | None, list[str]]:
    """The first token not in ``valid`` (quoted, or "an empty token"), and the repeated tokens.

    >>> token_problems(("tp", "tp", ""), ("tp", "dp"))
    ('an empty token', ['tp'])
    """
    bad = next((t for t in tokens if t not in valid), None)
    shown = None if bad is None else (repr(bad) if bad else "an empty token")
    return shown, sorted({t for t in tokens if tokens.count(t) > 1})


def _valid_kinds_text() -> str:
    return (
        "valid kinds are any '-'-joined set of the dense tokens tp, sp, dp, cp, pp; "
        "any '-'-joined set of the expert tokens etp, ep, edp (optionally with pp); "
        "or 'embd' / 'pos-embd' (standard kinds: "
        + ", ".join(DENSE_KINDS + EXPERT_KINDS + EMBEDDING_KINDS)
        + ")"
    )


@lru_cache(maxsize=256)
def parse_kind(kind: str) -> tuple[str, str, tuple[str, ...]]:
    """Return (canonical kind, family, kind tokens) for a lower-case kind string.

    family is "dense", "expert", "embd" or "pos-embd".
    """
    if kind in EMBEDDING_KINDS:
        return kind, kind, ()
    tokens = tuple(kind.split("-"))
    bad, dup = token_problems(tokens, set(DENSE_KIND_TOKENS) | EXPERT_ONLY_TOKENS)
    if bad is not None:
        raise LayoutError(f"kind {kind!r} has {bad}; {_valid_kinds_text()}")
    if dup:
        raise LayoutError(
            f"kind {kind!r} repeats {', '.join(repr(t) for t in dup)}; "
            f"name each token once; {_valid_kinds_text()}"
        )
    token_set = set(tokens)
    expert = token_set & EXPERT_ONLY_TOKENS
    dense = token_set & DENSE_ONLY_TOKENS
    if expert and dense:
        raise LayoutError(
            f"kind {kind!r} mixes dense tokens ({', '.join(sorted(dense))}) with expert "
            f"tokens ({', '.join(sorted(expert))}); dense and expert groups come from "
            f"different rank generators, so ask for them separately; {_valid_kinds_text()}"
        )
    if expert:
        ordered = tuple(t for t in EXPERT_KIND_TOKENS if t in token_set)
        return "-".join(ordered), "expert", ordered
    ordered = tuple(t for t in DENSE_KIND_TOKENS if t in token_set)
    return "-".join(ordered), "dense", ordered


def canonical_kind(kind: str) -> str:
    """Return the canonical spelling of a group kind.

    Dense tokens are put in the order tp, sp, dp, cp, pp; expert tokens in the
    order etp, ep, edp, pp.  Matching is case-insensitive.

    >>> canonical_kind("pp-tp")
    'tp-pp'
    >>> canonical_kind("cp-dp-tp")
    'tp-dp-cp'
    >>> canonical_kind("pp-ep-etp")
    'etp-ep-pp'
    """
    if not isinstance(kind, str):
        raise TypeError(f"kind must be a str such as 'tp' or 'dp-cp', got {kind!r}")
    return parse_kind(kind.lower())[0]


def normalise_kind(kind: str) -> str:
    """Canonical kind from a user spelling: case, ``_`` for ``-`` and aliases (``mp``) allowed.

    >>> normalise_kind("DP_with_CP")
    'dp-cp'
    >>> normalise_kind("mp")
    'tp-pp'
    """
    text = str(kind).strip().lower().replace("_", "-")
    return canonical_kind(_ALIASES.get(text, text))
