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
RESHARD_PURE = ["scoped_parallel.resharding.plan", "scoped_parallel.resharding.tiled", "scoped_parallel.resharding.flat", "scoped_parallel.resharding.staged",
              "scoped_parallel.resharding.api"]
STDLIB_ONLY = ["scoped_parallel.scope", "scoped_parallel.dispatch", "scoped_parallel.errors", "scoped_parallel.getters.table"]


@pytest.mark.parametrize("name", LAYOUT)
def test_layout_imports_no_torch_and_nothing_above_it(name):
    """The rank math imports neither torch nor any room above it (only the layout package and errors)."""
    foreign = sorted(t for t, _, _ in _imports(name) if t.split(".")[0] in ("torch", "deepspeed", "megatron", "transformers"))
    above = sorted(t for t in _project_imports(name) if not t.startswith(("scoped_parallel.layout", "scoped_parallel.errors")))
    assert (foreign, above) == ([], []), f"{name}: third-party {foreign}, rooms above the layout {above}"


@pytest.mark.parametrize("name", RESHARD_PURE)
def test_reshard_plan_and_api_import_no_torch_at_module_level(name):
    """The reshard plan (data, checks, report) and the one call import no third-party package
    at module level (the backends, in the adapters, bring torch and their target)."""
    third = _third_party_at_module_level(name)
    ours = sorted(t for t in _project_imports(name) if not t.startswith(("scoped_parallel.resharding", "scoped_parallel.errors")))
    assert (third, ours) == ([], []), f"{name}: third-party {third}, rooms outside resharding/errors {ours}"


def _third_party_at_module_level(name: str) -> list[str]:
    """The third-party modules ``name`` imports at module level (not inside functions or ``if`` blocks)."""
    path = SOURCES[name]
    tree = ast.parse(path.read_text(), str(path))
    imported = [
        alias.name if isinstance(node, ast.Import) else (node.module or "")
        for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom)) for alias in node.names
    ]
    return sorted(m for m in imported if m.split(".")[0] not in ("scoped_parallel", "__future__", *_stdlib()))


GETTERS = sorted(n for n in SOURCES if n.startswith("scoped_parallel.getters"))


@pytest.mark.parametrize("name", GETTERS)
def test_the_getters_import_no_torch_at_module_level(name):
    """The getter package (the table, the methods, the views for other libraries) loads without
    torch or megatron-core: the views import them inside their functions."""
    assert _third_party_at_module_level(name) == [], f"{name} imports {_third_party_at_module_level(name)} when it loads"


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
    """The core knows nothing of the adapters, DeepSpeed or transformers (megatron-core only lazily, in getters.views)."""
    bad = sorted(
        f"{t} (line {line})" for t, _, line in _imports(name)
        if t.startswith("scoped_parallel.adapters") or t.split(".")[0] in ("deepspeed", "transformers")
        or (t.split(".")[0] == "megatron" and name != "scoped_parallel.getters.views")
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


# ---------------------------------------------------------------- no reach into another module's private names
#
# A private name (``_x``, not a dunder) belongs to the module that defines it: a function or
# class, a module or class attribute, an attribute set on ``self``/``cls``, or a ``__slots__``
# entry (declarations under ``if TYPE_CHECKING:`` define nothing). Reading ``obj._x`` where
# ``_x`` is defined by another project module and not by this one is a reach into that
# module's insides (``self._x`` included: a mixin using its subclass's fields). Private names
# of the libraries the adapters re-point (DeepSpeed's, megatron-core's, torch's) are not
# defined here, so the rule leaves them to the adapters.


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _assigned(target: ast.AST) -> list[str]:
    if isinstance(target, (ast.Tuple, ast.List)):
        return [n for e in target.elts for n in _assigned(e)]
    if isinstance(target, ast.Starred):
        return _assigned(target.value)
    if isinstance(target, ast.Name):
        return [target.id]
    if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) and target.value.id in ("self", "cls"):
        return [target.attr]
    return []


def _outside_type_checking(tree: ast.AST):
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            stack.extend(node.orelse)
            continue
        yield node
        stack.extend(ast.iter_child_nodes(node))


def _private_definitions(tree: ast.AST) -> set[str]:
    found: set[str] = set()
    for node in _outside_type_checking(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            found.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            found.update(n for t in targets for n in _assigned(t))
            if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__slots__" for t in targets):
                found.update(c.value for c in ast.walk(node.value) if isinstance(c, ast.Constant) and isinstance(c.value, str))
    return {n for n in found if _private(n)}


def _private_reaches(sources: dict[str, str]) -> dict[str, list[str]]:
    """Per module (name -> source text), its ``obj._x`` reads of another module's private names."""
    trees = {name: ast.parse(text) for name, text in sources.items()}
    defined = {name: _private_definitions(tree) for name, tree in trees.items()}
    out: dict[str, list[str]] = {}
    for name, tree in trees.items():
        others = set().union(*(d for n, d in defined.items() if n != name))
        reaches = sorted(
            f"{ast.unparse(node)} (line {node.lineno})" for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and _private(node.attr)
            and node.attr not in defined[name] and node.attr in others
        )
        if reaches:
            out[name] = reaches
    return out


def test_no_module_reads_another_modules_private_names():
    """No module of the core or the adapters reads a private attribute another project module defines."""
    reaches = _private_reaches({name: path.read_text() for name, path in SOURCES.items()})
    assert reaches == {}, f"reads of other modules' private names: {reaches}"


def test_the_private_reach_finder_finds_a_reach():
    """The check above can fail: a mixin using its subclass's field, and a module reading another's, are reported;
    a module's own private names and a third-party private name are not."""
    owner = "class State:\n    def __init__(self):\n        self._memo = {}\n        self._groups = None\n"
    mixin = "class Getters:\n    if TYPE_CHECKING:\n        _groups: dict\n    def size(self):\n        return len(self._groups)\n"
    reader = "import torch\ndef forget(state):\n    state._memo.clear()\n    return torch._C\n_mine = 1\ndef own(x):\n    return x._mine\n"
    got = _private_reaches({"state": owner, "getters": mixin, "dispatch": reader})
    assert got == {"getters": ["self._groups (line 5)"], "dispatch": ["state._memo (line 3)"]}, got
