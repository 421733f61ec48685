"""Sizes for ``ParallelState.from_config``: explicit arguments, then the config, then defaults.

Pure dictionary logic (no torch, no DeepSpeed import). A config is a DeepSpeed
config dict, a path to a JSON file, or an object with a ``_param_dict`` mapping
(DeepSpeed's ``DeepSpeedConfig``).

Keys read (all optional):

=====================================  ==========================================
size                                   config keys, in the order they are tried
=====================================  ==========================================
``tensor_model_parallel_size``         ``tensor_model_parallel_size``, ``tensor_parallel.autotp_size``
``pipeline_model_parallel_size``       ``pipeline_model_parallel_size``, ``pipeline.stages``
``context_parallel_size``              ``context_parallel_size``
``sequence_parallel_size``             ``sequence_parallel_size``
``expert_model_parallel_size``         ``expert_model_parallel_size``
``expert_tensor_parallel_size``        ``expert_tensor_parallel_size``
``order``, ``name``                    ``order``, ``name`` in a ``scoped_parallel`` section
=====================================  ==========================================

Every key above may also appear in a ``"scoped_parallel": {...}`` section; an
unknown key there is an error. Two config keys for the same size must agree.
``data_parallel_size``, if present, is checked against the derived size by the
caller (it needs the world size).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from scoped_parallel.layout.axes import AXES, SIZE_KEYWORDS
from scoped_parallel.errors import LayoutError

__all__ = ["check_data_parallel_size", "load_config", "sizes_from_config"]

_SECTION = "scoped_parallel"
_SECTION_KEYS = frozenset(SIZE_KEYWORDS + ("order", "name", "data_parallel_size"))
# size -> the dotted config paths that may give it (besides the size's own name)
_ALIASES = {axis.keyword: axis.config_aliases for axis in AXES if axis.config_aliases}


def load_config(config: Any) -> dict[str, Any]:
    """Return the config as a dict (from a dict, a JSON path, or a DeepSpeedConfig)."""
    if isinstance(config, Mapping):
        return dict(config)
    if isinstance(config, (str, os.PathLike)):
        path = os.fspath(config)
        try:
            with open(path, encoding="utf-8") as fh:
                loaded = json.load(fh)
        except FileNotFoundError:
            raise LayoutError(f"config file {path!r} does not exist") from None
        except json.JSONDecodeError as err:
            raise LayoutError(f"config file {path!r} is not valid JSON: {err}") from None
        if not isinstance(loaded, dict):
            raise LayoutError(f"config file {path!r} must hold a JSON object, got {type(loaded).__name__}")
        return loaded
    params = getattr(config, "_param_dict", None)
    if isinstance(params, Mapping):
        return dict(params)
    raise TypeError(
        "config must be a DeepSpeed config dict, a path to a JSON file or a DeepSpeedConfig, "
        f"got {type(config).__name__}"
    )


def _lookup(config: Mapping[str, Any], dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def sizes_from_config(config: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Resolve ParallelState keyword arguments: overrides > config > (absent: defaults)."""
    section = config.get(_SECTION, {})
    if not isinstance(section, Mapping):
        raise LayoutError(f"config key {_SECTION!r} must be an object, got {section!r}")
    unknown = sorted(set(section) - _SECTION_KEYS)
    if unknown:
        raise LayoutError(
            f"unknown key(s) {unknown} in config section {_SECTION!r}; valid keys: {sorted(_SECTION_KEYS)}"
        )
    out: dict[str, Any] = {}
    for size in SIZE_KEYWORDS:
        found: list[tuple[str, Any]] = []
        for path in (f"{_SECTION}.{size}", size) + _ALIASES.get(size, ()):
            value = _lookup(config, path)
            if value is None or value == "auto" or (path == "tensor_parallel.autotp_size" and value == 0):
                continue  # DeepSpeed's own "decide for me" / "off" values
            if isinstance(value, bool) or not isinstance(value, int):
                raise LayoutError(
                    f"config key {path!r} must be an integer, got {value!r} ({type(value).__name__})"
                )
            found.append((path, value))
        if len({v for _, v in found}) > 1:
            listed = ", ".join(f"{p}={v}" for p, v in found)
            raise LayoutError(f"contradictory config values for {size}: {listed}; keep one of them")
        if found:
            out[size] = found[0][1]
    for key in ("order", "name"):
        if key in section:
            out[key] = section[key]
    dp = section.get("data_parallel_size", config.get("data_parallel_size"))
    if dp is not None:
        out["_data_parallel_size"] = dp
    out.update(overrides)
    return out


def check_data_parallel_size(kwargs: Mapping[str, Any], expected_dp: Any, world: int) -> None:
    """Raise LayoutError if the config's ``data_parallel_size`` contradicts the other sizes."""
    from scoped_parallel.layout.grid import ParallelLayout

    offset = kwargs.get("rank_offset", 0)
    layout_keys = set(SIZE_KEYWORDS) | {"order", "rank_offset"}
    layout = ParallelLayout(
        kwargs.get("world_size") or world - offset,
        **{k: v for k, v in kwargs.items() if k in layout_keys},
    )
    if expected_dp != layout.data_parallel_size:
        raise LayoutError(
            f"config key 'data_parallel_size' is {expected_dp!r} but the layout {layout!r} "
            f"derives data parallel size {layout.data_parallel_size}; remove the key or fix "
            "the other sizes"
        )
