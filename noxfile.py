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

A third session, ``stack``, runs the WHOLE suite on one (Python, torch, megatron-core)
combination each (``STACKS``), installed the way a user's environment would be: torch and
megatron-core first, then DeepSpeed, then this project with its extras, which must not
change either (checked). It is not in the default sessions (each venv is a multi-GB CUDA
build of torch from the index; ``nox -s stack`` runs it). torch newer than the releases on
this project's machines' disk needs the pip cap lifted: the session sets
``PIP_CONFIG_FILE=/dev/null``. Interpreters are found on ``PATH`` (``make compat-stack``
puts pyenv's there).
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
    "tests/adapters/deepspeed/test_adapter_deepspeed_engines.py",
    "tests/adapters/deepspeed/test_adapter_deepspeed_experts.py",
    "tests/adapters/deepspeed/test_adapter_deepspeed_groups.py",
    "tests/adapters/deepspeed/test_adapter_deepspeed_initialize.py",
    "tests/adapters/deepspeed/test_adapter_deepspeed_install.py",
    "tests/adapters/deepspeed/test_adapter_deepspeed_zeropp.py",
    "tests/adapters/deepspeed/test_adapter_deepspeed_checkpointing.py",
    "tests/compat/test_compat_parallel_state_wrappers.py",
    "tests/adapters/test_adapter_ulysses.py",
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


#: (Python, torch, megatron-core) of each ``stack`` session: the newest torch on every Python
#: that megatron-core's newest minors support, each megatron-core minor that needs Python 3.12,
#: and Python 3.11 (megatron-core 0.16 is its newest) on the newest torch. transformers is
#: the newest the index can install (5.25.0 needs ``kernels>=0.19.1``, which the index lacks).
STACKS = [
    ("3.11", "2.14.1", "0.16.1"),
    ("3.12", "2.15.0", "0.17.1"),
    ("3.12", "2.15.0", "0.18.2"),
    ("3.12", "2.15.0", "0.19.2"),
    ("3.13", "2.15.0", "0.19.2"),  # tried, not claimed: see the README's Compatibility section
]


@nox.session(python=False)
@nox.parametrize("python,torch,megatron", STACKS, ids=[f"py{p}-torch{t}-mcore{m}" for p, t, m in STACKS])
def stack(session: nox.Session, python: str, torch: str, megatron: str) -> None:
    """The whole suite on one (Python, torch, megatron-core); the extras may not move torch or megatron-core."""
    env_dir = f"{session.create_tmp()}/venv"
    session.run(f"python{python}", "-m", "venv", "--clear", env_dir, external=True)
    py = f"{env_dir}/bin/python"
    env = {"PIP_CONFIG_FILE": "/dev/null"}

    def pip(*args: str) -> None:
        session.run(py, "-m", "pip", "install", "-q", *args, env=env, external=True)

    pip("--upgrade", "pip")
    pip(f"torch=={torch}", f"megatron-core=={megatron}")
    pip("setuptools", "wheel", "packaging", "ninja")
    pip("--no-build-isolation", f"deepspeed=={NEWEST_DEEPSPEED}")
    check = (
        "import importlib.metadata as m, sys; got = (m.version('torch'), m.version('megatron-core')); "
        f"want = ({torch!r}, {megatron!r}); "
        "sys.exit(0 if got[0].split('+')[0] == want[0] and got[1] == want[1] else f'extras moved {want} to {got}')"
    )
    pip("-e", ".[megatron,deepspeed,ulysses,test]")
    session.run(py, "-c", check, external=True)
    session.run(
        py, "-m", "pytest", "-q", "-p", "no:cacheprovider", *session.posargs,
        env={"OMP_NUM_THREADS": "1"}, external=True,
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
