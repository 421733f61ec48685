"""Sphinx extension: every public object the API reference documents must have a docstring.

autodoc renders an undocumented object (with ``undoc-members``) or silently drops
it (without); neither fails a build. This extension turns both cases into
warnings, which ``sphinx-build -W`` makes fatal:

* ``autodoc-process-docstring``: a module, class, exception, function, method,
  property or attribute whose docstring is empty. Classes must have their *own*
  docstring (one inherited from a base class, or the signature a dataclass writes
  in, does not count); methods and properties may inherit theirs from a
  documented base. Module attributes are documented with a ``#:`` comment.
* ``env-check-consistency`` (after all pages are read): a name in the ``__all__``
  of a module listed in ``public_docstrings_modules`` that no autodoc directive
  documented.

Each warning names the object and points at its definition (``path:line``).
Configuration (``conf.py``):

``public_docstrings_modules``
    modules whose ``__all__`` is the public surface that must be documented.
``public_docstrings_exempt``
    ``{"module.name": "reason"}``: names that need no entry of their own.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import os
import pkgutil
import re
from typing import Any

from docutils.parsers.rst import directives
from sphinx.application import Sphinx
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective

logger = logging.getLogger(__name__)

_SEEN_KEY = "public_docstrings_seen"


def _root(app: Sphinx) -> str:
    return os.path.dirname(os.path.abspath(app.confdir))


def _relative(app: Sphinx, path: str) -> str:
    root = _root(app)
    path = os.path.abspath(path)
    return os.path.relpath(path, root) if path.startswith(root + os.sep) else path


def _unwrap(obj: Any) -> Any:
    if isinstance(obj, property):
        return obj.fget
    if isinstance(obj, (classmethod, staticmethod)):
        return obj.__func__
    return getattr(obj, "func", obj) if type(obj).__name__ == "cached_property" else obj


def _location(app: Sphinx, name: str, obj: Any) -> str | None:
    """``path:line`` of the definition of ``name`` (a dotted name), best effort."""
    target = _unwrap(obj)
    try:
        path = inspect.getsourcefile(target)
        line = 1 if inspect.ismodule(target) else inspect.getsourcelines(target)[1]
        if path and not inspect.ismodule(target):
            line = _skip_decorators(path, line)
        if path:
            return f"{_relative(app, path)}:{line}"
    except (TypeError, OSError):
        pass
    # Data (or something inspect cannot place): find the assignment in the module.
    parts = name.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            module = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        path = getattr(module, "__file__", None)
        if not path:
            return None
        attr = parts[cut] if cut == len(parts) - 1 else parts[-1]
        with open(path, encoding="utf-8") as fh:
            source = fh.readlines()
        # An assignment, else the import that brings the name in, else the module.
        for pattern in (rf"^\s*(?:self\.)?{re.escape(attr)}\s*[:=]", rf"^\s*from\s.*\bimport\b.*\b{re.escape(attr)}\b"):
            for number, text in enumerate(source, start=1):
                if re.match(pattern, text):
                    return f"{_relative(app, path)}:{number}"
        return f"{_relative(app, path)}:1"
    return None


def _skip_decorators(path: str, line: int) -> int:
    """The ``def``/``class`` line at or after ``line`` (inspect reports the first decorator)."""
    with open(path, encoding="utf-8") as fh:
        lines = fh.readlines()
    for number in range(line, min(line + 20, len(lines)) + 1):
        if re.match(r"\s*(async\s+def|def|class)\s", lines[number - 1]):
            return number
    return line


def _own_class_doc(cls: type) -> str | None:
    doc = cls.__dict__.get("__doc__")
    if not isinstance(doc, str) or not doc.strip():
        return None
    if dataclasses.is_dataclass(cls) and doc.startswith(f"{cls.__name__}("):
        return None  # the signature dataclasses write when a class has no docstring
    return doc


def _value_doc_is_type_doc(obj: Any, lines: list[str]) -> bool:
    """True when the 'docstring' of a data value is just its type's docstring."""
    type_doc = getattr(type(obj), "__doc__", None)
    if not isinstance(type_doc, str):
        return False
    return "\n".join(lines).strip() == inspect.cleandoc(type_doc).strip()


def _check_docstring(app: Sphinx, what: str, name: str, obj: Any, options: Any, lines: list[str]) -> None:
    getattr(app.env, _SEEN_KEY).add(name)
    if name in app.config.public_docstrings_exempt:
        return
    empty = not any(line.strip() for line in lines)
    if what in ("class", "exception") and inspect.isclass(obj):
        empty = empty or _own_class_doc(obj) is None
    elif what in ("data", "attribute") and not empty:
        empty = _value_doc_is_type_doc(obj, lines)
    if empty:
        logger.warning(
            "public %s %s has no docstring",
            what,
            name,
            location=_location(app, name, obj),
            type="public_docstrings",
            subtype="missing",
        )


def _reset(app: Sphinx) -> None:
    setattr(app.env, _SEEN_KEY, set())


def _check_coverage(app: Sphinx, env: Any) -> None:
    seen: set[str] = getattr(env, _SEEN_KEY, set())
    for modname in app.config.public_docstrings_modules:
        try:
            module = importlib.import_module(modname)
        except Exception as exc:  # noqa: BLE001 - reported, not raised
            logger.warning("cannot import %s: %s", modname, exc, type="public_docstrings", subtype="import")
            continue
        if modname not in seen:
            logger.warning(
                "public module %s is not documented by any automodule directive",
                modname,
                location=_location(app, modname, module),
                type="public_docstrings",
                subtype="undocumented",
            )
        public = getattr(module, "__all__", None)
        if public is None:
            public = [n for n, v in vars(module).items() if not n.startswith("_") and getattr(v, "__module__", None) == modname]
        for attr in public:
            full = f"{modname}.{attr}"
            if full in app.config.public_docstrings_exempt:
                continue
            if full in seen:
                value = getattr(module, attr, None)
                if inspect.isclass(value):
                    _check_inherited(app, seen, full, value)
                continue
            try:
                value = getattr(module, attr)
            except Exception as exc:  # noqa: BLE001 - a lazy attribute that fails to import
                logger.warning(
                    "public name %s cannot be imported: %s: %s",
                    full,
                    type(exc).__name__,
                    exc,
                    location=_location(app, modname, module),
                    type="public_docstrings",
                    subtype="import",
                )
                continue
            if inspect.ismodule(value) and value.__name__ in seen:
                continue  # a public submodule with its own automodule entry
            logger.warning(
                "public name %s (in %s.__all__) is not in the API reference%s",
                full,
                modname,
                " (a module attribute is documented by a '#:' comment above it)"
                if not callable(value) and not inspect.ismodule(value)
                else "",
                location=_location(app, full, value),
                type="public_docstrings",
                subtype="undocumented",
            )


def _is_private_path(dotted: str) -> bool:
    return any(part.startswith("_") for part in dotted.split("."))


def _check_inherited(app: Sphinx, seen: set[str], full: str, cls: type) -> None:
    """Public members a public class gets from a private base must be documented with it."""
    for attr in dir(cls):
        if attr.startswith("_") or f"{full}.{attr}" in seen:
            continue
        owner = next((base for base in cls.__mro__ if attr in vars(base)), None)
        if owner is None or owner is cls or owner.__module__ == "builtins":
            continue
        if _is_private_path(f"{owner.__module__}.{owner.__qualname__}"):
            logger.warning(
                "public member %s.%s (defined in private %s.%s) is not in the API reference "
                "(give the class directive :inherited-members:)",
                full,
                attr,
                owner.__module__,
                owner.__qualname__,
                location=_location(app, f"{owner.__module__}.{attr}", vars(owner)[attr]),
                type="public_docstrings",
                subtype="undocumented",
            )


class PublicSubmodules(SphinxDirective):
    """``.. public-submodules:: package``: an ``automodule`` for each public submodule.

    Options given to the directive are passed on to every ``automodule``, e.g.
    ``:no-members:`` to show only each module's docstring. Submodules are found on
    the package's ``__path__`` at build time, so adding or renaming one needs no
    edit here; names starting with ``_`` are skipped.
    """

    required_arguments = 1
    has_content = False
    option_spec = {"no-members": directives.flag, "heading": directives.unchanged}

    def run(self) -> list[Any]:
        package = self.arguments[0]
        module = importlib.import_module(package)
        names = sorted(
            info.name
            for info in pkgutil.iter_modules(getattr(module, "__path__", []))
            if not info.name.startswith("_")
        )
        underline = self.options.get("heading")
        lines: list[str] = []
        for name in names:
            full = f"{package}.{name}"
            if underline:
                title = f"``{full}``"
                lines += [title, underline * len(title), ""]
            lines.append(f".. automodule:: {full}")
            if "no-members" in self.options:
                lines.append("   :no-members:")
            lines.append("")
        source, _ = self.get_source_info()
        self.state_machine.insert_input(lines, source)
        return []


def setup(app: Sphinx) -> dict[str, Any]:
    app.add_config_value("public_docstrings_modules", [], "env")
    app.add_config_value("public_docstrings_exempt", {}, "env")
    app.connect("builder-inited", _reset)
    # Before napoleon and friends rewrite the lines (lower priority runs first).
    app.connect("autodoc-process-docstring", _check_docstring, priority=100)
    app.connect("env-check-consistency", _check_coverage)
    app.add_directive("public-submodules", PublicSubmodules)
    # The set of documented names is kept on the environment by one process only.
    return {"version": "1", "parallel_read_safe": False, "parallel_write_safe": True, "env_version": 1}
