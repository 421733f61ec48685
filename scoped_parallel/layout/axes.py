"""The one table of parallel dimensions that every other place derives from.

Each ``Axis`` names one size a layout is built from: its short token (as
in Megatron's ``order`` strings and group kinds), the keyword argument of
:class:`~scoped_parallel.ParallelLayout` / :class:`~scoped_parallel.ParallelState`
(Megatron's ``initialize_model_parallel`` spelling), the DeepSpeed config keys
that may give it (``ParallelState.from_config``), the command-line flag and the
spec key of ``python -m scoped_parallel layout``, and a line of help.

Adding a dimension means adding a row here and teaching the rank math its place
(``_layout_checks.py``, ``_kinds.py``, ``layout.py``; ARCHITECTURE.md lists the
steps); the constructor keywords and signatures, the size properties, the config
reader, the CLI flags and the ``--state`` keys come from this table. Pure data: no
torch import.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["AXES", "Axis", "BY_KEYWORD", "BY_TOKEN", "SIZE_KEYWORDS"]


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
