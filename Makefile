# The README's two set-up commands are `make demo` and `make test`; both create
# .venv and install what they need on a fresh machine (so does `make docs`).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
NPROC  ?= 4

.PHONY: setup demo test test-quick test-any-cpu test-torch-newest test-newest-stack test-megatron-versions bench docs compat compat-stack clean

setup: $(VENV)/.installed

# torch==2.13.0 first: on this project's machines pip takes the CPU build from local
# disk in seconds; an unpinned resolution could pull a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

demo: setup
	OMP_NUM_THREADS=1 $(BIN)/torchrun --standalone --nproc-per-node $(NPROC) examples/rl_ppo.py --verify

test: setup
	$(BIN)/pytest -q

# The quick tier for iteration: everything but the multi-process world and slow tests
# (about 2 minutes here; `make test` runs those too).
test-quick: setup
	$(BIN)/pytest -q -m "not world and not slow"

# The numerical claims on another machine's kernels: the reshard and matrix tests again with
# two intra-op threads per rank, and with ATen's portable kernels (no AVX2/AVX-512 paths).
# A bitwise claim that held only on one CPU's BLAS fails here. Not in CI (time).
ANY_CPU_TESTS := tests/resharding/test_reshard_megatron.py tests/resharding/test_reshard_zero.py tests/resharding/test_reshard_stale.py \
	tests/matrix/test_matrix_deepspeed.py tests/matrix/test_matrix_megatron.py
test-any-cpu: setup
	SCOPED_PARALLEL_TEST_THREADS=2 $(BIN)/pytest -q $(ANY_CPU_TESTS)
	ATEN_CPU_CAPABILITY=default $(BIN)/pytest -q $(ANY_CPU_TESTS)

# The newest torch on Python 3.11 (torch 2.15 runs in test-newest-stack, Python 3.12).
# On this project's machines 2.14.1 lies on local disk as a CUDA build (~5.4 GB venv)
# that runs on the CPU; it gets its own venv and its own JIT extension cache.
VENV_NEWEST := .venv-torch-newest
TORCH_NEWEST ?= 2.14.1

$(VENV_NEWEST)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV_NEWEST)
	$(VENV_NEWEST)/bin/python -m pip install -q --upgrade pip
	$(VENV_NEWEST)/bin/python -m pip install -q torch==$(TORCH_NEWEST)
	$(VENV_NEWEST)/bin/python -m pip install -q -e '.[test]'
	touch $@

test-torch-newest: $(VENV_NEWEST)/.installed
	TORCH_EXTENSIONS_DIR=/tmp/scoped_parallel_torch_ext_newest $(VENV_NEWEST)/bin/pytest -q

# The stack users install today, in a fresh venv of its own: Python 3.12, torch 2.15,
# megatron-core 0.19 (0.17+ ship for Python >= 3.12 only), DeepSpeed 0.19.8 and the newest
# transformers this index has. torch and megatron-core go in first, as a user's environment
# would have them; the project's extras must then install WITHOUT changing either (checked
# here: the step fails on any downgrade). PIP_CONFIG_FILE=/dev/null: this project's
# machines cap pip at the torch on local disk (2.14.1); 2.15 is a CUDA build from the
# index that runs on the CPU. DeepSpeed is built against the venv's torch (no isolation).
PY312 ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.12*/bin/python) $(shell command -v python3.12))
VENV_STACK := .venv-py312-newest
STACK_TORCH ?= 2.15.0
STACK_MEGATRON ?= 0.19.2
STACK_PIP := PIP_CONFIG_FILE=/dev/null $(VENV_STACK)/bin/python -m pip install -q

$(VENV_STACK)/.installed: pyproject.toml
	test -x "$(PY312)" || { echo "no Python 3.12 found: set PY312=/path/to/python3.12"; exit 1; }
	test -x $(VENV_STACK)/bin/python || $(PY312) -m venv $(VENV_STACK)
	$(STACK_PIP) --upgrade pip
	$(STACK_PIP) torch==$(STACK_TORCH) megatron-core==$(STACK_MEGATRON)
	$(STACK_PIP) setuptools wheel packaging ninja
	$(STACK_PIP) --no-build-isolation deepspeed==0.19.8
	$(VENV_STACK)/bin/python -m pip freeze | grep -iE "^(torch|megatron-core)==" > $(VENV_STACK)/before.txt
	$(STACK_PIP) -e '.[megatron,deepspeed,ulysses,test]'
	$(VENV_STACK)/bin/python -m pip freeze | grep -iE "^(torch|megatron-core)==" > $(VENV_STACK)/after.txt
	diff $(VENV_STACK)/before.txt $(VENV_STACK)/after.txt || { echo "installing the extras changed torch or megatron-core"; exit 1; }
	touch $@

test-newest-stack: $(VENV_STACK)/.installed
	$(VENV_STACK)/bin/python -c "import sys, torch, megatron.core, deepspeed, transformers; print('newest stack:', sys.version.split()[0], 'torch', torch.__version__, 'deepspeed', deepspeed.__version__, 'transformers', transformers.__version__)"
	$(VENV_STACK)/bin/pytest -q

# The megatron adapter, its oracle tests and the GPTModel proof against each older
# megatron-core minor that installs on this Python (0.16 is in `make test`); one venv
# per minor (torch pinned first), kept out of `make test` (about 3 min per minor here).
MEGATRON_MINORS ?= 0.15 0.14 0.13
MEGATRON_TESTS := tests/adapters/megatron/test_adapter_megatron.py tests/getters/test_megatron_oracle.py tests/adapters/megatron/test_megatron_gpt.py

.venv-megatron-%/.installed: pyproject.toml
	$(PYTHON) -m venv .venv-megatron-$*
	.venv-megatron-$*/bin/python -m pip install -q --upgrade pip
	.venv-megatron-$*/bin/python -m pip install -q torch==2.13.0
	.venv-megatron-$*/bin/python -m pip install -q "megatron-core==$*.*" einops pytest hypothesis
	.venv-megatron-$*/bin/python -m pip install -q --no-deps -e .
	touch $@

test-megatron-versions: $(foreach v,$(MEGATRON_MINORS),.venv-megatron-$(v)/.installed)
	@for v in $(MEGATRON_MINORS); do \
	  echo "== megatron-core $$v"; \
	  .venv-megatron-$$v/bin/pytest -q $(MEGATRON_TESTS) || exit 1; \
	done

bench: setup
	$(BIN)/python benchmarks/run.py

# API reference from the docstrings, into docs/_build/html. Warnings are errors
# (-W, all reported before failing: --keep-going), unresolved references inside
# the project too (-n); docs/_ext/public_docstrings.py makes a public name without a
# docstring a warning. -E: every page is re-read, so that check sees all of them.
DOCS_BUILD := docs/_build

$(VENV)/.installed-docs: $(VENV)/.installed pyproject.toml
	$(BIN)/python -m pip install -q -e '.[test,docs]'
	touch $@

docs: $(VENV)/.installed-docs
	$(BIN)/sphinx-build -E -W --keep-going -n -q -b html docs $(DOCS_BUILD)/html
	@echo "docs: $(DOCS_BUILD)/html/index.html"

# The compatibility matrix (noxfile.py): the DeepSpeed/Ulysses adapter tests on every
# supported DeepSpeed minor and on the oldest/newest transformers; one virtual
# environment per session under NOX_ENVDIR (torch==2.13.0 installed first in each).
# Not part of CI (time); CI runs the newest versions only. The README's table records
# the last run. NOX_ENVDIR defaults to .nox (git-ignored).
NOX_ENVDIR ?= .nox
$(VENV)/.installed-nox: $(VENV)/.installed
	$(BIN)/python -m pip install -q nox
	touch $@

compat: $(VENV)/.installed-nox
	$(BIN)/nox --envdir $(NOX_ENVDIR) 2>&1 | tee compat-report.txt
	@grep -E "^nox > (\*|Session)" compat-report.txt

# The (Python, torch, megatron-core) axes: the whole suite per combination (noxfile.py's
# STACKS; several GB and ~10 minutes each). pyenv's interpreters are put on PATH.
compat-stack: $(VENV)/.installed-nox
	PATH="$$(ls -d $(HOME)/.pyenv/versions/3.1[123]*/bin 2>/dev/null | tr '\n' ':')$$PATH" \
	  $(BIN)/nox --envdir $(NOX_ENVDIR) -s stack 2>&1 | tee compat-stack-report.txt
	@grep -E "^nox > (\*|Session)" compat-stack-report.txt

clean:
	rm -rf .nox compat-report.txt $(VENV) $(VENV_NEWEST) $(VENV_STACK) .venv-megatron-* build dist *.egg-info .pytest_cache .hypothesis docs/_build
