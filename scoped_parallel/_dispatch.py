"""The one resolver/dispatch template of the adapters (re-exported by :mod:`scoped_parallel._scope`).

Patched library functions answer from the active state. Their wrappers are built
here, from one template, so that the resolution rule of
:mod:`scoped_parallel._scope` and its fast path exist once: adapters say what to
call inside a scope and what outside, nothing else. This module reads the scope's
ContextVar only through ``_scope._get`` (its bound ``get``) and never writes it.
Standard library only.
"""

from __future__ import annotations

import ast
import functools
import inspect
import types
from typing import TYPE_CHECKING, Any, Callable

from scoped_parallel._scope import _get, current_state_or_none
from scoped_parallel._scope_registry import ACTIVE as _ACTIVE
from scoped_parallel.errors import NoActiveStateError

if TYPE_CHECKING:  # pragma: no cover
    from scoped_parallel.state import ParallelState

__all__ = ["dispatching", "forget_memo", "is_strict", "resolve", "set_strict"]


class _Strict:
    """Whether a patched function with no state to answer from raises (True) or falls through."""

    __slots__ = ("on",)

    def __init__(self) -> None:
        self.on = False


_STRICT = _Strict()


def set_strict(strict: bool) -> None:
    """Make patched functions called where no state resolves raise (``True``) or fall through."""
    _STRICT.on = bool(strict)


def is_strict() -> bool:
    """Whether patched functions raise where no state resolves (see :func:`set_strict`)."""
    return _STRICT.on


def resolve(what: str) -> ParallelState | None:
    """The state a patched function named ``what`` answers from, or ``None`` to fall through.

    The full rule (innermost scope, then the fallback of :func:`current_state_or_none`),
    plus strict mode: with ``set_strict(True)`` no state raises
    :class:`NoActiveStateError` naming ``what``. Hot paths use :func:`dispatching`,
    which inlines the common cases of this function.
    """
    frame = _get()
    if frame is not None:
        return frame[0]  # type: ignore[no-any-return]
    state = current_state_or_none() if _ACTIVE else None
    if state is None and _STRICT.on:
        raise NoActiveStateError(
            f"{what} was called outside any scope while scoped_parallel adapters are installed "
            "in strict mode. Call it inside `with state.activate():` (or on an engine bound with "
            "state.bind(engine)), or install the adapters with strict=False to fall back to the "
            "library's own global state."
        )
    return state


def forget_memo(state: Any) -> None:
    """Drop the answers :func:`dispatching` memoized for ``state`` (its inputs changed)."""
    memo = getattr(state, "_memo", None)
    if memo is not None:
        memo.clear()


def dispatching(
    original: Callable[..., Any],
    inside: Callable[..., Any],
    what: str,
    *,
    memoize: bool = False,
    exact: bool = False,
) -> Callable[..., Any]:
    """A replacement for ``original`` that answers ``inside(state, *args)`` in a scope.

    Where :func:`resolve` finds no state, the replacement calls ``original(*args)``
    (or raises in strict mode). With ``memoize=True`` the answer of a call *without
    arguments* is kept per state in the state's ``_memo`` dict until
    :func:`forget_memo` (the state clears it on ``destroy()``); calls with arguments
    always ask ``inside``. Use it for readers whose answer depends only on the state
    and on inputs that call ``forget_memo`` when they change.

    With ``exact=True`` the replacement is compiled once for ``original`` (a plain
    Python function without ``*args``/``**kwargs``): it has the original's exact
    parameters and defaults, passes them on positionally (keyword-only ones by
    keyword), memoizes the calls whose every argument *is* its default, and, outside
    any scope, calls the original. Any other ``original`` gets the generic replacement.

    Worked example (what the DeepSpeed adapter does for a getter)::

        groups._get_data_parallel_group = dispatching(
            original, lambda state: state.get_data_parallel_group(),
            "deepspeed.utils.groups._get_data_parallel_group", memoize=True)
    """
    if exact:
        compiled = _exact(original, inside, what, memoize)
        if compiled is not None:
            return compiled
    # Every name the wrappers use is a closure cell (a local-speed lookup), and the
    # first test is the only one a call inside a scope makes before answering.
    get, active, strict = _get, _ACTIVE, _STRICT

    if not memoize:

        @functools.wraps(original)
        def scoped(*args: Any, **kwargs: Any) -> Any:
            frame = get()
            if frame is not None:
                return inside(frame[0], *args, **kwargs)
            state = resolve(what) if (active or strict.on) else None
            if state is None:
                return original(*args, **kwargs)
            return inside(state, *args, **kwargs)

        return scoped

    key = object()  # hashed by identity: the cheapest key a dict has

    if not inspect.signature(original).parameters:

        @functools.wraps(original)
        def scoped_reader() -> Any:
            frame = get()
            if frame is None:
                if not (active or strict.on):
                    return original()
                state = resolve(what)
                if state is None:
                    return original()
            else:
                state = frame[0]
            try:
                return state._memo[key]
            except KeyError:
                answer = state._memo[key] = inside(state)
                return answer

        return scoped_reader

    @functools.wraps(original)
    def scoped_getter(*args: Any, **kwargs: Any) -> Any:
        frame = get()
        if frame is None:
            state = resolve(what) if (active or strict.on) else None
            if state is None:
                return original(*args, **kwargs)
        else:
            state = frame[0]
        if args or kwargs:
            return inside(state, *args, **kwargs)
        try:
            return state._memo[key]
        except KeyError:
            answer = state._memo[key] = inside(state)
            return answer

    return scoped_getter


# ---------------------------------------------------------------------- exact-signature template
#
# ``dispatching(..., exact=True)`` compiles one function per patched callable, with the
# original's own parameter list, so a call costs no ``*args``/``**kwargs`` packing and
# introspection shows the original's signature. Outside every scope it calls the original:
# one C call (``ContextVar.get``), two tests and one Python call more than the original.
# (Inlining the original's body would save that call, but it means recompiling another
# project's source at run time; we do not.)

_CO_NOT_PLAIN = inspect.CO_GENERATOR | inspect.CO_COROUTINE | inspect.CO_ASYNC_GENERATOR | inspect.CO_VARARGS \
    | inspect.CO_VARKEYWORDS

_EXACT_TEMPLATE = """\
def _sp_factory(_sp_get, _sp_active, _sp_strict, _sp_resolve, _sp_what, _sp_original, _sp_inside, _sp_key, {defaults}):
    def {name}({params}):
        _sp_frame = _sp_get()
        if _sp_frame is not None:
            _sp_state = _sp_frame[0]
        elif _sp_active or _sp_strict.on:
            _sp_state = _sp_resolve(_sp_what)
            if _sp_state is None:
                return _sp_original({call})
        else:
            _sp_BODY
{memo}        return _sp_inside(_sp_state{comma}{call})
    return {name}
"""

_MEMO_TEMPLATE = """\
        if {all_default}:
            try:
                return _sp_state._memo[_sp_key]
            except KeyError:
                _sp_answer = _sp_state._memo[_sp_key] = _sp_inside(_sp_state)
                return _sp_answer
"""


def _exact(original: Any, inside: Callable[..., Any], what: str, memoize: bool) -> Callable[..., Any] | None:
    """The exact-signature replacement of ``original`` (see ``dispatching(exact=True)``), or None."""
    if type(original) is not types.FunctionType or original.__code__.co_flags & _CO_NOT_PLAIN:
        return None
    parameters = list(inspect.signature(original, follow_wrapped=False).parameters.values())
    if any(p.name.startswith("_sp_") for p in parameters):
        return None
    P = inspect.Parameter
    params, call, defaults, tests = [], [], [], []
    slash = star = False
    for p in parameters:
        if p.kind is P.POSITIONAL_ONLY:
            slash = True
        elif slash:
            params.append("/")
            slash = False
        if p.kind is P.KEYWORD_ONLY and not star:
            params.append("*")
            star = True
        params.append(p.name)
        call.append(p.name if p.kind is not P.KEYWORD_ONLY else f"{p.name}={p.name}")
        if p.default is not P.empty:
            defaults.append(f"_sp_d{len(defaults)}")
            tests.append(f"{p.name} is {defaults[-1]}")
        else:
            tests.append("False")  # a required argument: never the argument-free call
    if slash:
        params.append("/")
    memo = ""
    if memoize and "False" not in tests:
        memo = _MEMO_TEMPLATE.format(all_default=" and ".join(tests) or "True")
    source = _EXACT_TEMPLATE.format(
        name=original.__name__, params=", ".join(params), call=", ".join(call), comma=", " if call else "",
        defaults=", ".join(defaults) or "_sp_none=None", memo=memo,
    )
    tree = ast.parse(source)
    line = original.__code__.co_firstlineno
    inner = tree.body[0].body[0]  # type: ignore[attr-defined]
    branch = inner.body[1].orelse[0]
    branch.orelse = ast.parse(f"return _sp_original({', '.join(call)})").body
    for node in ast.walk(tree):  # the template's lines point at the original's ``def``
        if "lineno" in node._attributes:
            node.lineno = node.end_lineno = line  # type: ignore[attr-defined]
            node.col_offset = node.end_col_offset = 0  # type: ignore[attr-defined]
    ast.fix_missing_locations(tree)
    namespace: dict[str, Any] = {}
    exec(compile(tree, original.__code__.co_filename, "exec"), {"__builtins__": __builtins__}, namespace)  # noqa: S102
    default_values = [p.default for p in parameters if p.default is not P.empty]
    fn = namespace["_sp_factory"](_get, _ACTIVE, _STRICT, resolve, what, original, inside, object(), *default_values)
    fn.__defaults__ = original.__defaults__
    fn.__kwdefaults__ = original.__kwdefaults__
    functools.update_wrapper(fn, original)
    return fn
