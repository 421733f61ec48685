"""The public API for adapter authors: patched callables that answer from the active state.

A library function re-pointed at the scope is built here, from one template, so the
resolution rule of :mod:`scoped_parallel.scope` and its fast path exist once: an
adapter says what to call inside a scope and what outside, nothing else.

* :func:`dispatching` builds the replacement of a library callable;
* :func:`resolve` is the full rule for cold paths (and strict mode's error);
* :func:`forget_memo` drops a state's memoized answers when their inputs change;
* :func:`set_strict` / :func:`is_strict`: whether patched callables raise outside
  every scope;
* :func:`carrying_backward` / :func:`hook_in_scope` (from :mod:`scoped_parallel.scope`)
  carry a scope into autograd's threads;
* per-state data of an adapter lives in ``state.adapter_record(owner, factory)``.

Worked example, an adapter re-pointing a DeepSpeed getter on 8 ranks, where the actor
has TP=2 (DP=4) and the critic DP=8::

    groups._get_data_parallel_group = dispatching(
        original, lambda state: state.get_data_parallel_group(),
        "deepspeed.utils.groups._get_data_parallel_group", memoize=True)
    with actor.activate():
        groups._get_data_parallel_group()   # rank 0: the actor's group (0, 2, 4, 6)
    with critic.activate():
        groups._get_data_parallel_group()   # rank 0: the critic's group (0..7)
    groups._get_data_parallel_group()       # outside: DeepSpeed's own function

This module reads the scope's ContextVar only through ``scope._get`` and never
writes it. Standard library only.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import linecache
import types
from typing import Any, Callable

from scoped_parallel.errors import NoActiveStateError
from scoped_parallel.scope import _ACTIVE, _get, carrying_backward, current_state_or_none, hook_in_scope

__all__ = [
    "carrying_backward",
    "dispatching",
    "forget_memo",
    "hook_in_scope",
    "is_strict",
    "resolve",
    "set_strict",
]


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


def resolve(what: str) -> Any:
    """The state a patched function named ``what`` answers from, or ``None`` to fall through.

    The full rule (innermost scope, then the fallback of :func:`~scoped_parallel.scope.current_state_or_none`),
    plus strict mode: with ``set_strict(True)`` no state raises
    :class:`~scoped_parallel.errors.NoActiveStateError` naming ``what``. Hot paths use :func:`dispatching`,
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
    store = getattr(state, "store", None)
    if store is not None:
        store.memo.clear()


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
    arguments* is kept per state in ``state.store.memo`` (a :class:`~scoped_parallel.store.StateStore`) until
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
                return state.store.memo[key]
            except KeyError:
                answer = state.store.memo[key] = inside(state)
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
            return state.store.memo[key]
        except KeyError:
            answer = state.store.memo[key] = inside(state)
            return answer

    return scoped_getter


# ---------------------------------------------------------------------- exact-signature template
#
# ``dispatching(..., exact=True)`` compiles one function per patched callable, with the
# original's own parameter list, so a call costs no ``*args``/``**kwargs`` packing and
# introspection shows the original's signature. Outside every scope it calls the original:
# one C call (``ContextVar.get``), two tests and one Python call more than the original.
# The generated source is ours and says so: it is compiled under a file name of its own,
# ``<scoped_parallel.dispatch:N what>``, registered in ``linecache`` (tracebacks, ``inspect``
# and profilers show the generated lines), and its frames run in a namespace of their own whose
# ``__name__`` is this module's (every name they use is passed in to the factory).

_CO_NOT_PLAIN = inspect.CO_GENERATOR | inspect.CO_COROUTINE | inspect.CO_ASYNC_GENERATOR | inspect.CO_VARARGS \
    | inspect.CO_VARKEYWORDS

_EXACT_TEMPLATE = """\
def _sp_factory(_sp_get, _sp_active, _sp_strict, _sp_resolve, _sp_what, _sp_original, _sp_inside, _sp_key, {defaults}):
    def {name}({params}):
        # scoped_parallel.dispatch: the replacement of {what}
        _sp_frame = _sp_get()
        if _sp_frame is not None:
            _sp_state = _sp_frame[0]
        elif _sp_active or _sp_strict.on:
            _sp_state = _sp_resolve(_sp_what)
            if _sp_state is None:
                return _sp_original({call})
        else:
            return _sp_original({call})
{memo}        return _sp_inside(_sp_state{comma}{call})
    return {name}
"""

_MEMO_TEMPLATE = """\
        if {all_default}:
            try:
                return _sp_state.store.memo[_sp_key]
            except KeyError:
                _sp_answer = _sp_state.store.memo[_sp_key] = _sp_inside(_sp_state)
                return _sp_answer
"""

_SERIAL = itertools.count()


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
        defaults=", ".join(defaults) or "_sp_none=None", memo=memo, what=what,
    )
    filename = f"<scoped_parallel.dispatch:{next(_SERIAL)} {what}>"
    # mtime None: linecache.checkcache keeps the entry (there is no file to compare with).
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    namespace: dict[str, Any] = {"__builtins__": __builtins__, "__name__": __name__}
    exec(compile(source, filename, "exec"), namespace)  # noqa: S102
    default_values = [p.default for p in parameters if p.default is not P.empty]
    fn = namespace["_sp_factory"](_get, _ACTIVE, _STRICT, resolve, what, original, inside, object(), *default_values)
    fn.__defaults__ = original.__defaults__
    fn.__kwdefaults__ = original.__kwdefaults__
    functools.update_wrapper(fn, original)
    fn.__module__ = __name__  # the function is ours; __wrapped__ leads to the original
    return fn
