"""The compatibility matrix: the DeepSpeed and Ulysses adapter tests per supported version.

``make compat`` runs every session here; CI runs only the newest versions (``make test``).
Each session builds its own virtual environment and installs, in this order:

1. ``torch==2.13.0`` (on this project's machines the CPU build comes from local disk; an
   unpinned resolution would pull a multi-GB CUDA build),
2. the DeepSpeed and transformers versions under test, DeepSpeed without build
   isolation (its ``setup.py`` imports the torch installed in step 1),
3. this project without dependencies, and the test tools.

Two axes: ``deepspeed`` (the newest patch of each supported minor, with the newest
transformers) and ``transformers`` (the oldest 4.x and the newest 5.x the Ulysses
adapter supports, with the newest DeepSpeed).
"""

from __future__ import annotations

import nox

TORCH = "2.13.0"
#: the newest patch of each DeepSpeed minor tried (0.18.9 is run but not supported: see the
#: README's table). 0.17 is not run: its
#: ``UlyssesSPAttentionHF.register_with_transformers`` takes ``max_length`` before
#: ``micro_batch_size`` and has no ``seq_length``/``disable_in_eval`` (the Ulysses adapter
#: refuses it by signature).
DEEPSPEED = ["0.18.9", "0.19.8"]
#: the oldest 4.x and the newest 5.x transformers the Ulysses adapter supports (DeepSpeed 0.19.8
#: itself refuses transformers < 4.51.3 for Ulysses; 4.50 also lacks AttentionInterface._local_mapping)
TRANSFORMERS = ["4.51.3", "5.24.0"]
NEWEST_DEEPSPEED = DEEPSPEED[-1]
NEWEST_TRANSFORMERS = TRANSFORMERS[-1]

#: the tests that exercise DeepSpeed and the Ulysses adapter
ADAPTER_TESTS = [
    "tests/test_adapter_deepspeed_engines.py",
    "tests/test_adapter_deepspeed_experts.py",
    "tests/test_adapter_deepspeed_groups.py",
    "tests/test_adapter_deepspeed_initialize.py",
    "tests/test_adapter_deepspeed_install.py",
    "tests/test_adapter_deepspeed_zeropp.py",
    "tests/test_adapter_deepspeed_checkpointing.py",
    "tests/test_compat_parallel_state_wrappers.py",
    "tests/test_adapter_ulysses.py",
]

nox.options.sessions = ["deepspeed", "transformers"]
nox.options.reuse_existing_virtualenvs = True


def _install(session: nox.Session, deepspeed: str, transformers: str) -> None:
    session.install(f"torch=={TORCH}")
    session.install("setuptools", "wheel", "packaging", "ninja")
    session.install("--no-build-isolation", f"deepspeed=={deepspeed}", f"transformers=={transformers}")
    session.install("pytest>=8", "hypothesis>=6", "build>=1")
    session.install("--no-deps", "--no-build-isolation", "-e", ".")


def _run(session: nox.Session) -> None:
    tmp = session.create_tmp()
    session.run(
        "pytest", "-q", "-p", "no:cacheprovider", *ADAPTER_TESTS, *session.posargs,
        env={"TORCH_EXTENSIONS_DIR": f"{tmp}/torch_extensions", "OMP_NUM_THREADS": "1"},
    )


@nox.session(python="3.11")
@nox.parametrize("version", DEEPSPEED)
def deepspeed(session: nox.Session, version: str) -> None:
    """The adapter tests on one DeepSpeed version, newest transformers."""
    _install(session, version, NEWEST_TRANSFORMERS)
    _run(session)


@nox.session(python="3.11")
@nox.parametrize("version", TRANSFORMERS[:-1])
def transformers(session: nox.Session, version: str) -> None:
    """The adapter tests on one transformers version, newest DeepSpeed (the newest pair is in ``deepspeed``)."""
    _install(session, NEWEST_DEEPSPEED, version)
    _run(session)
