"""Sphinx configuration for the scoped_parallel API reference (``make docs``).

The reference is generated from docstrings with autodoc; ``_ext/public_docstrings``
makes a public name without a docstring a warning, and the Makefile builds with
``-W --keep-going -n`` so that every such warning, and every reference that does not
resolve inside this project, fails the build.
"""

from __future__ import annotations

import os
import sys
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "_ext"))
# The package itself comes from the environment (`pip install -e .`): it maps the
# top-level adapters/ folder to scoped_parallel.adapters, which sys.path cannot.

project = "scoped_parallel"
author = "scoped_parallel authors"
copyright = "scoped_parallel authors"  # noqa: A001 - Sphinx's name
try:
    from importlib.metadata import version as _version

    release = _version("scoped-parallel")
except Exception:  # noqa: BLE001 - not installed: leave the version out
    release = ""
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",  # Google-style "Args:" sections; see setup() below
    "public_docstrings",
    "myst_parser",  # the guide pages are Markdown (docs/*.md)
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
myst_heading_anchors = 3

exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]
templates_path: list[str] = []
html_theme = "alabaster"
html_static_path: list[str] = []

# -- autodoc ----------------------------------------------------------------------
# undoc-members: an undocumented public member is rendered (and then reported by
# public_docstrings) instead of being dropped without a word.
autodoc_default_options = {
    "members": True,
    "undoc-members": True,
    "show-inheritance": True,
    "member-order": "bysource",
}
autoclass_content = "class"
autodoc_typehints = "signature"
autodoc_inherit_docstrings = True
# The optional targets (deepspeed, megatron-core, transformers) are imported by the
# adapters only inside install() and the patched calls, never at module import, so
# nothing needs mocking; a target missing here would therefore not break the build.
# Should an import-time dependency appear, list it here rather than failing:
autodoc_mock_imports: list[str] = []
# A private name that a public signature mentions only as a string (imported under
# TYPE_CHECKING): spelled out, it falls under the private-module rule of nitpicky below.
# (Not for names used in unions: Sphinx 9 then prints "TypeAliasForwardRef".)
autodoc_type_aliases = {
    "Ledger": "scoped_parallel.adapters._ledger.Ledger",
}

# -- napoleon: Google-style sections ("Args:", "Returns:") only ------------------------
napoleon_google_docstring = True
napoleon_numpy_docstring = False

# -- public_docstrings ----------------------------------------------------------------
public_docstrings_modules = [
    "scoped_parallel",
    "scoped_parallel.testing",
    "scoped_parallel.scope",
    "scoped_parallel.dispatch",
    "scoped_parallel.getters.table",
    "scoped_parallel.adapters",
    "scoped_parallel.adapters.deepspeed",
    "scoped_parallel.adapters.megatron",
    "scoped_parallel.adapters.ulysses",
]
public_docstrings_exempt = {
    "scoped_parallel.__version__": "a version string; shown on the index page",
}

# -- nitpicky (-n) --------------------------------------------------------------------
# Every cross-reference to this project must resolve. References into other
# projects cannot (no intersphinx: the build must work offline), so they are not
# checked; Sphinx itself already accepts builtins and typing names.
# References into private modules or classes (``scoped_parallel.layout.config``,
# ``_ledger.Ledger``, a base class ``_Mixin``) are not in the reference either; they
# render as plain names.
_EXTERNAL = ("torch", "deepspeed", "megatron", "transformers", *sorted(sys.stdlib_module_names))
nitpick_ignore_regex = [
    (r"py:.*", rf"({'|'.join(_EXTERNAL)})(\..*)?"),
    (r"py:.*", r"(\w+\.)*_\w*(\..*)?"),  # any dotted component starting with "_"
]

# Importing deepspeed/megatron may warn (e.g. about missing CUDA); those are not
# documentation problems.
warnings.filterwarnings("ignore", category=UserWarning, module=r"(deepspeed|megatron|transformers|torch)(\..*)?")
warnings.filterwarnings("ignore", category=FutureWarning, module=r"(deepspeed|megatron|transformers|torch)(\..*)?")


# -- napoleon only where it belongs ----------------------------------------------------
# napoleon reads the docstring of a data attribute or property whose first line has
# a colon ("Dense data parallel size: world_size / ...") as "type: description" and
# turns the words before the colon into a cross-reference. Sections such as "Args:"
# only occur in functions, classes and modules, so the others are left alone.
_NO_NAPOLEON = ("data", "attribute", "property")


def _napoleon_except_attributes(app, what, name, obj, options, lines):  # type: ignore[no-untyped-def]
    from sphinx.ext.napoleon import _process_docstring

    if what not in _NO_NAPOLEON:
        _process_docstring(app, what, name, obj, options, lines)


def setup(app):  # type: ignore[no-untyped-def]
    from sphinx.errors import ConfigError
    from sphinx.ext.napoleon import _process_docstring

    ours = [
        listener
        for listener in app.events.listeners.get("autodoc-process-docstring", [])
        if listener.handler is _process_docstring
    ]
    if len(ours) != 1:
        raise ConfigError("docs/conf.py: cannot find napoleon's autodoc-process-docstring listener to wrap")
    app.disconnect(ours[0].id)
    app.connect("autodoc-process-docstring", _napoleon_except_attributes, priority=ours[0].priority)
