"""The shape of the code: one direction of imports, no circles, adapters on the public core.

Tier 1 (no torch.distributed): every ``import`` statement of ``scoped_parallel/`` and
``adapters/`` is read from the source (module level, inside functions and under
``TYPE_CHECKING`` alike), resolved to the project's modules, and checked against the
rules ARCHITECTURE.md states.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[0] == "adapters":
        parts = ["scoped_parallel", *parts]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _sources() -> dict[str, Path]:
    files = list((ROOT / "scoped_parallel").rglob("*.py")) + list((ROOT / "adapters").rglob("*.py"))
    return {_module_name(p): p for p in files}


SOURCES = _sources()


def _imports(name: str) -> list[tuple[str, str, int]]:
    """``(module imported, name imported or "", line)`` of every import in module ``name``."""
    path = SOURCES[name]
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: list[tuple[str, str, int]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(alias.name, "", node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                if submodule in SOURCES:  # `from package import module`
                    out.append((submodule, "", node.lineno))
                else:
                    out.append((base, alias.name, node.lineno))
    return out


def _edges() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {name: set() for name in SOURCES}
    for name in SOURCES:
        for target, _, _ in _imports(name):
            if target in SOURCES and target != name:
                graph[name].add(target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_circle():
    """No two modules of the project import each other, directly or through others."""
    assert _cycles(_edges()) == [], "import circles (each list is one strongly connected set of modules)"


def test_the_cycle_finder_finds_a_circle():
    """The check above can fail: a made-up circle a -> b -> c -> a is reported."""
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def _project_imports(name: str) -> set[str]:
    return {t for t, _, _ in _imports(name) if t.startswith("scoped_parallel")}


LAYOUT = sorted(n for n in SOURCES if n.startswith("scoped_parallel.layout"))
REFIT_PURE = ["scoped_parallel.refit.plan", "scoped_parallel.refit.tiled", "scoped_parallel.refit.flat", "scoped_parallel.refit.staged",
              "scoped_parallel.refit.api"]
STDLIB_ONLY = ["scoped_parallel.scope", "scoped_parallel.dispatch", "scoped_parallel.errors", "scoped_parallel.getters.table"]


@pytest.mark.parametrize("name", LAYOUT)
def test_layout_imports_no_torch_and_nothing_above_it(name):
    """The rank math imports neither torch nor any room above it (only the layout package and errors)."""
    foreign = sorted(t for t, _, _ in _imports(name) if t.split(".")[0] in ("torch", "deepspeed", "megatron", "transformers"))
    above = sorted(t for t in _project_imports(name) if not t.startswith(("scoped_parallel.layout", "scoped_parallel.errors")))
    assert (foreign, above) == ([], []), f"{name}: third-party {foreign}, rooms above the layout {above}"


@pytest.mark.parametrize("name", REFIT_PURE)
def test_refit_plan_and_api_import_no_torch_at_module_level(name):
    """The refit plan (data, checks, report) and the one call import no third-party package
    at module level (the backends, in the adapters, bring torch and their target)."""
    path = SOURCES[name]
    tree = ast.parse(path.read_text(), str(path))
    top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    third = sorted(
        (a.name if isinstance(n, ast.Import) else (n.module or "")) for n in top for a in n.names
        if ((a.name if isinstance(n, ast.Import) else (n.module or "")).split(".")[0] not in ("scoped_parallel", "__future__"))
        and (a.name if isinstance(n, ast.Import) else (n.module or "")).split(".")[0] not in _stdlib()
    )
    ours = sorted(t for t in _project_imports(name) if not t.startswith(("scoped_parallel.refit", "scoped_parallel.errors")))
    assert (third, ours) == ([], []), f"{name}: third-party {third}, rooms outside refit/errors {ours}"


@pytest.mark.parametrize("name", STDLIB_ONLY)
def test_scope_and_dispatch_use_the_standard_library_only(name):
    """The scope, the adapter API, the errors and the getter table import no third-party package."""
    third_party = sorted(
        t for t, _, _ in _imports(name)
        if t.split(".")[0] not in ("scoped_parallel", "__future__") and t.split(".")[0] not in _stdlib()
    )
    allowed = {"scoped_parallel.scope", "scoped_parallel.errors"}
    ours = sorted(_project_imports(name) - allowed)
    assert (third_party, ours) == ([], []), f"{name}: third-party {third_party}, project modules {ours}"


def _stdlib() -> frozenset[str]:
    import sys

    return frozenset(sys.stdlib_module_names)


CORE = sorted(n for n in SOURCES if not n.startswith(("scoped_parallel.adapters", "scoped_parallel.compat")))


@pytest.mark.parametrize("name", CORE)
def test_the_core_never_imports_an_adapter_or_a_target_library(name):
    """The core knows nothing of the adapters, DeepSpeed or transformers (megatron-core only lazily in getters.megatron)."""
    bad = sorted(
        f"{t} (line {line})" for t, _, line in _imports(name)
        if t.startswith("scoped_parallel.adapters") or t.split(".")[0] in ("deepspeed", "transformers")
        or (t.split(".")[0] == "megatron" and name != "scoped_parallel.getters.megatron")
    )
    assert bad == [], f"{name} imports {bad}"


ADAPTERS = sorted(n for n in SOURCES if n.startswith(("scoped_parallel.adapters", "scoped_parallel.compat")))


@pytest.mark.parametrize("name", ADAPTERS)
def test_adapters_use_only_public_names_of_the_core(name):
    """Adapters and compat import no private module or private name of the core."""
    private = sorted(
        f"{t}{'.' + n if n else ''} (line {line})" for t, n, line in _imports(name)
        if t.startswith("scoped_parallel") and not t.startswith(("scoped_parallel.adapters", "scoped_parallel.compat"))
        and (any(part.startswith("_") for part in t.split(".")) or n.startswith("_"))
    )
    assert private == [], f"{name} uses private core names {private}"
