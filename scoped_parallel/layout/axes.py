"""The one table of parallel dimensions that every other place derives from.

Each ``Axis`` names one size a layout is built from: its short token (as
in Megatron's ``order`` strings and group kinds), the keyword argument of
:class:`~scoped_parallel.ParallelLayout` / :class:`~scoped_parallel.ParallelState`
(Megatron's ``initialize_model_parallel`` spelling), the DeepSpeed config keys
that may give it (``ParallelState.from_config``), the command-line flag and the
spec key of ``python -m scoped_parallel layout``, and a line of help.

Below the table, every ordering of the tokens the rank math uses (Megatron's
rank-generator sequence, the canonical spelling of kinds, ``order``'s tokens, ...) is
listed once, so that no other module spells a token tuple. Adding a dimension means a
row here and its place in those orderings (ARCHITECTURE.md lists the steps); the
constructor keywords and signatures, the size properties, the config reader, the CLI
flags and the ``--state`` keys come from this table. Pure data: no torch import.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "APPEND_SEQUENCE",
    "AXES",
    "Axis",
    "BY_KEYWORD",
    "BY_TOKEN",
    "DENSE_AXES",
    "DENSE_KIND_TOKENS",
    "DENSE_ONLY_TOKENS",
    "DERIVED_TOKENS",
    "EXPERT_AXES",
    "EXPERT_KIND_TOKENS",
    "EXPERT_ONLY_TOKENS",
    "EXPERT_TOKEN_TO_ORDER",
    "ORDER_TOKENS",
    "REPR_SIZES",
    "SIZE_ORDER",
    "TOKENS",
]


@dataclass(frozen=True)
class Axis:
    """One parallel dimension, as every interface spells it."""

    #: short token: ``order`` strings, group kinds, ``--state`` specs, ``layout.sizes()`` keys
    token: str
    #: keyword of ParallelLayout / ParallelState (Megatron's name)
    keyword: str
    #: dotted DeepSpeed config paths that may give the size, besides ``keyword`` itself
    config_aliases: tuple[str, ...]
    #: what the size means, for help texts
    help: str
    #: ``None`` means "derived" (expert tensor parallel defaults to tensor parallel)
    default: int | None = 1

    @property
    def cli_flag(self) -> str:
        """The command-line flag, e.g. ``--tp``."""
        return f"--{self.token}"


#: Every size a layout is given, in the order of the constructor's keywords.
AXES: tuple[Axis, ...] = (
    Axis("tp", "tensor_model_parallel_size", ("tensor_parallel.autotp_size",), "tensor model parallel size"),
    Axis("pp", "pipeline_model_parallel_size", ("pipeline.stages",), "pipeline model parallel size"),
    Axis("cp", "context_parallel_size", (), "context parallel size"),
    Axis("sp", "sequence_parallel_size", (), "Ulysses sequence parallel size"),
    Axis("ep", "expert_model_parallel_size", (), "expert model parallel size"),
    Axis(
        "etp",
        "expert_tensor_parallel_size",
        (),
        "expert tensor parallel size (default: the tensor parallel size)",
        default=None,
    ),
)

#: The constructor keywords of the sizes, in table order.
SIZE_KEYWORDS: tuple[str, ...] = tuple(axis.keyword for axis in AXES)
BY_KEYWORD: dict[str, Axis] = {axis.keyword: axis for axis in AXES}
BY_TOKEN: dict[str, Axis] = {axis.token: axis for axis in AXES}

#: Sizes that are derived, not given: data parallel and expert data parallel.
DERIVED_TOKENS: tuple[str, ...] = ("dp", "edp")
#: Every token a size, a kind or ``order`` may name.
TOKENS: tuple[str, ...] = tuple(axis.token for axis in AXES) + DERIVED_TOKENS

# ---------------------------------------------------------------------- orderings of the tokens

#: Dense axes in Megatron's rank-generator sequence: keys of ``coordinates()``, what
#: ``rank_at()`` accepts, the dense line of ``table()``, DeviceMesh dimensions.
DENSE_AXES: tuple[str, ...] = ("tp", "cp", "sp", "dp", "pp")
#: Expert axes of the expert rank generator.
EXPERT_AXES: tuple[str, ...] = ("etp", "ep", "edp")
#: Expert kind token -> the ``order`` token of the expert generator it stands for.
EXPERT_TOKEN_TO_ORDER: dict[str, str] = {"etp": "tp", "ep": "ep", "edp": "dp", "pp": "pp"}
#: Keys of ``ParallelLayout.sizes()``, in this order.
SIZE_ORDER: tuple[str, ...] = DENSE_AXES + ("ep", "etp", "edp")
#: Sizes ``repr(layout)`` shows (when not 1), in this order.
REPR_SIZES: tuple[str, ...] = ("tp", "pp", "cp", "sp", "dp", "ep")
#: Canonical token sequence of dense kinds (``"sp-dp"``, ``"tp-dp-cp"``) and of expert kinds.
DENSE_KIND_TOKENS: tuple[str, ...] = ("tp", "sp", "dp", "cp", "pp")
EXPERT_KIND_TOKENS: tuple[str, ...] = ("etp", "ep", "edp", "pp")
#: Tokens that make a kind expert-only / dense-only (``pp`` is in both families).
EXPERT_ONLY_TOKENS: frozenset[str] = frozenset(EXPERT_KIND_TOKENS) - frozenset(DENSE_KIND_TOKENS)
DENSE_ONLY_TOKENS: frozenset[str] = frozenset(DENSE_KIND_TOKENS) - frozenset(EXPERT_KIND_TOKENS)
#: Tokens that may appear in ``order``.
ORDER_TOKENS: tuple[str, ...] = ("tp", "cp", "ep", "dp", "pp", "sp")
#: Megatron appends the tokens an ``order`` leaves out in this sequence (``sp`` goes before ``dp``).
APPEND_SEQUENCE: tuple[str, ...] = ("tp", "pp", "dp", "ep", "cp")
