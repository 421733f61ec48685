"""DeepSpeed adapter: DeepSpeed's process-wide parallel state, answered by the active scope.

DeepSpeed 0.19.x keeps one model's parallel layout in module globals: the ``mpu``
handed to ``deepspeed.initialize`` (``groups.mpu``, last writer wins), a
``mesh_device``, AutoTP's tensor/data groups, the MoE expert group dicts and the
sequence-parallel groups of ``parallel_state_sp``. Two models with different layouts
in one process (actor and critic in RLHF) therefore read each other's groups. After
:func:`install`, inside ``with state.activate():`` every one of those reads answers
from ``state``; outside any scope each patched function calls the original, so
DeepSpeed behaves exactly as unpatched (with ``install(strict=True)`` a patched
function called outside a scope raises ``NoActiveStateError``).

What is re-pointed, and where (each module's doc has the details):

==================  =======================================================================
``readers``         ``groups`` readers of ``mpu``/``mesh_device`` (``_get_data_parallel_*``,
                    ``_get_sequence_*``, ...): DeepSpeed's rules on the scope's mpu and mesh
``autotp``          AutoTP's ``groups`` globals: the state's ``tp`` and ``dp`` groups
``experts``         MoE expert groups and their creators: per-state dicts
``sequence``        ``parallel_state_sp``: the state's ``sp`` and ``sp-dp`` groups
``module_attrs``    ``groups.mpu`` / ``groups.mesh_device`` attributes, per scope
``initialize``      ``deepspeed.initialize``: an engine runs in the scope of its state
``zero``            ZeRO-3 partitions over SP x DP for a state with SP > 1
``zeropp``          ZeRO++ hpZ and qgZ all-to-all groups: per state, cut from its ZeRO ranks
``checkpointing``   activation checkpointing's globals (``configure``): per state
``pipeline``        pipeline ``p2p`` globals (``_grid``, ``_groups``, ``_async``): per engine,
                    in force while that engine's ``__init__``/``train_batch``/... runs
``_records``        the per-state record (``state.adapter_record("deepspeed", ...)``) and
                    ``_release_process_group_references``
==================  =======================================================================

``groups`` and ``parallel_state_sp`` functions are patched as functions
(``groups.f = scoped_f``, which also reaches callers inside ``groups.py``), together
with every other ``deepspeed.*`` module binding the same function object (e.g. the
star re-export in ``deepspeed.utils``). Every change goes through the adapters'
ledger, and every patched function finds its state with the scope's ``dispatching``.

Not re-pointed: the cloned WORLD group (shared by every model), Domino globals, and
the step-time paths themselves: run each engine's ``forward``/``backward``/``step``
(a pipeline engine's ``train_batch``/``eval_batch``) inside its state's scope, because
ZeRO-0, BF16 and gradient clipping look the data-parallel group up at step time.
Pipeline ``p2p`` globals are re-pointed per engine, not per scope (``pipeline``).
"""

from __future__ import annotations

import inspect
import types
from typing import Any, Callable

from scoped_parallel.dispatch import dispatching
from scoped_parallel.adapters._ledger import require
from scoped_parallel.adapters.deepspeed import autotp, checkpointing, experts, pipeline, readers, sequence, zeropp  # noqa: F401
from scoped_parallel.adapters.deepspeed._records import scoped_release
from scoped_parallel.adapters.deepspeed._shared import GROUPS_IMPL, MEMOIZED, ORIGINALS, OWNER, SP_IMPL, Mods
from scoped_parallel.adapters.deepspeed.initialize import scoped_initialize
from scoped_parallel.adapters.deepspeed.module_attrs import ATTRIBUTES, scoped_module_class
from scoped_parallel.adapters.deepspeed.zero import scoped_convert_to_zero_parameters

__all__ = [
    "GROUPS_FUNCTIONS",
    "OPTIONAL_GROUPS_FUNCTIONS",
    "SEQUENCE_PARALLEL_FUNCTIONS",
    "install",
    "uninstall",
]

#: ``deepspeed.utils.groups`` functions re-pointed at the active scope.
GROUPS_FUNCTIONS: tuple[str, ...] = tuple(GROUPS_IMPL)
#: ``parallel_state_sp`` functions (aliases included) re-pointed at the active scope.
SEQUENCE_PARALLEL_FUNCTIONS: tuple[str, ...] = tuple(SP_IMPL)


#: ``groups`` functions that older supported DeepSpeed versions lack (new in 0.19): patched when present
OPTIONAL_GROUPS_FUNCTIONS = frozenset({"_init_tp_groups_with_new_group"})


def _replacements(
    module: types.ModuleType, table: dict[str, Callable[..., Any]], memoized: set[str]
) -> dict[str, Any]:
    """The scope-dispatching replacement of each of ``table``'s functions in ``module``."""
    replacements = {}
    for name, inside in table.items():
        if name in OPTIONAL_GROUPS_FUNCTIONS and name not in vars(module):
            continue
        original = require(OWNER, module, name)
        # A reader is memoized only while DeepSpeed's takes no arguments (an upstream
        # change of signature turns the memo off rather than answering wrongly).
        memoize = name in memoized and not inspect.signature(original).parameters
        replacements[name] = dispatching(original, inside, f"{module.__name__}.{name}", memoize=memoize)
    return replacements


def install(ledger: Any) -> None:
    """Re-point DeepSpeed's global parallel state at the active scope (see the module doc)."""
    import deepspeed
    import deepspeed.comm
    import deepspeed.runtime.sequence_parallel.parallel_state_sp as parallel_state_sp
    import deepspeed.runtime.zero.parameter_offload as parameter_offload
    import deepspeed.utils.bwc
    import deepspeed.utils.groups as groups

    Mods.groups, Mods.comm, Mods.bwc, Mods.ledger = groups, deepspeed.comm, deepspeed.utils.bwc, ledger
    for name in ATTRIBUTES:
        require(OWNER, groups, name)
    # New in 0.19.8 (WORLD teardown); older versions have no hook to follow.
    release = vars(groups).get("_release_process_group_references")
    offload = require(OWNER, parameter_offload, "DeepSpeedZeRoOffload")
    convert = require(OWNER, offload, "_convert_to_zero_parameters")
    initialize = require(OWNER, deepspeed, "initialize")

    ORIGINALS.update(
        ledger.patch_everywhere(OWNER, groups, _replacements(groups, GROUPS_IMPL, MEMOIZED), "deepspeed")
    )
    ledger.patch_everywhere(OWNER, parallel_state_sp, _replacements(parallel_state_sp, SP_IMPL, set()), "deepspeed")
    if release is not None:
        ledger.patch(OWNER, groups, "_release_process_group_references", scoped_release(release))
    ledger.swap_module_class(OWNER, groups, scoped_module_class(type(groups)))
    ledger.patch(OWNER, offload, "_convert_to_zero_parameters", scoped_convert_to_zero_parameters(convert))
    ledger.patch_everywhere(OWNER, deepspeed, {"initialize": scoped_initialize(initialize)}, "deepspeed")
    checkpointing.install(ledger)
    pipeline.install(ledger)


def uninstall() -> None:
    """Forget the originals (the ledger restores every patched object by identity).

    Per-state records stay with their states, so a state keeps the groups DeepSpeed
    created for it if the adapters are installed again.
    """
    ORIGINALS.clear()
