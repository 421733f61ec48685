"""``dispatching(..., exact=True)``: the compiled, exact-signature replacement of a getter.

Tier 2 (standard library only): same answers, same failures and same parameters as the
generic replacement, in and outside a scope (where it calls the original).
"""

from __future__ import annotations

import inspect
import textwrap


import pytest


from _dispatch_originals import GLOBAL as _GLOBAL  # noqa: E402
from _dispatch_originals import no_return, positional, reader  # noqa: E402

from scoped_parallel.dispatch import dispatching, set_strict  # noqa: E402
from scoped_parallel.scope import Activation  # noqa: E402
from scoped_parallel.store import StateStore  # noqa: E402
from scoped_parallel.errors import NoActiveStateError  # noqa: E402



class Stub:
    def __init__(self, name):
        self.name = name
        self.store = StateStore(lambda: name)  # where dispatching memoizes


def inside(state, *args, **kwargs):
    inside.calls += 1
    return (state.name, args, kwargs)


inside.calls = 0


@pytest.mark.parametrize("original", [reader, positional, no_return])
def test_signature_is_exact_and_nothing_is_packed(original):
    patched = dispatching(original, inside, "t", memoize=True, exact=True)
    assert inspect.signature(patched, follow_wrapped=False) == inspect.signature(original)
    assert not patched.__code__.co_flags & (inspect.CO_VARARGS | inspect.CO_VARKEYWORDS)
    assert patched.__wrapped__ is original and patched.__name__ == original.__name__


def test_outside_any_scope_it_is_the_original():
    patched = dispatching(reader, inside, "t", memoize=True, exact=True)
    with pytest.raises(AssertionError, match="not initialized"):
        patched()
    _GLOBAL["value"] = 7
    try:
        assert patched() == patched(False) == patched(check=True, scale=2) == 7
    finally:
        _GLOBAL["value"] = None
    p2 = dispatching(positional, inside, "t", exact=True)
    assert p2(1) == ("orig", 1, 2, 3) and p2(1, 5, c=9) == ("orig", 1, 5, 9)
    with pytest.raises(TypeError):
        p2(a=1)  # positional-only stays positional-only
    p3 = dispatching(no_return, inside, "t", exact=True)
    assert p3(4) is None and _GLOBAL.pop("seen") == 4  # falling off the end returns None


def test_inside_a_scope_memoizes_only_the_all_default_call():
    patched = dispatching(reader, inside, "t", memoize=True, exact=True)
    state = Stub("actor")
    inside.calls = 0
    with Activation(state):
        first = patched()
        assert patched() is first and patched(True) is first and inside.calls == 1
        assert patched(False) == ("actor", (False,), {"scale": 1}) and inside.calls == 2
        assert patched(scale=3) == ("actor", (True,), {"scale": 3})
    assert state.store.memo  # memoized per state


def test_strict_mode_raises_outside_any_scope():
    patched = dispatching(reader, inside, "my.getter", memoize=True, exact=True)
    set_strict(True)
    try:
        with pytest.raises(NoActiveStateError, match="my.getter"):
            patched(False)
    finally:
        set_strict(False)


def test_an_original_without_source_gets_an_exact_replacement_too():
    namespace = {}
    exec(textwrap.dedent("""
        def hidden(x=1):
            return ("hidden", x)
    """), namespace)
    patched = dispatching(namespace["hidden"], inside, "t", exact=True)
    assert patched() == ("hidden", 1)
    assert not patched.__code__.co_flags & (inspect.CO_VARARGS | inspect.CO_VARKEYWORDS)
    assert inspect.signature(patched, follow_wrapped=False) == inspect.signature(namespace["hidden"])


def test_variadic_originals_get_the_generic_replacement():
    def variadic(*args, **kwargs):
        return args, kwargs

    patched = dispatching(variadic, inside, "t", exact=True)
    assert patched.__code__.co_flags & inspect.CO_VARARGS, "a variadic original got a compiled replacement"
    assert patched(1, k=2) == ((1,), {"k": 2})


def test_a_profiler_and_a_traceback_show_the_replacement_as_ours():
    """The compiled replacement's frames are ours: our file name (its source in linecache), our module."""
    import linecache
    import sys
    import traceback

    from _dispatch_originals import __file__ as originals_file  # noqa: E402

    patched = dispatching(reader, inside, "tests.reader()", exact=True)
    calls = []

    def profile(frame, event, arg):
        if event == "call":
            calls.append((frame.f_code.co_filename, frame.f_code.co_name, frame.f_globals.get("__name__")))

    _GLOBAL["value"] = 3
    sys.setprofile(profile)
    try:
        patched()
    finally:
        sys.setprofile(None)
    first = calls[0]
    assert first[0].startswith("<scoped_parallel.dispatch:") and first[1:] == ("reader", "scoped_parallel.dispatch"), (
        f"the replacement's frame reads {first}; expected our synthetic file, 'reader', scoped_parallel.dispatch"
    )
    assert calls[1][0] == originals_file, f"the next frame is the original's: {calls[1]}"
    assert "tests.reader()" in "".join(linecache.getlines(first[0])), "the generated source is in linecache"
    assert patched.__module__ == "scoped_parallel.dispatch" and patched.__wrapped__ is reader

    _GLOBAL["value"] = None
    try:
        patched()
    except AssertionError:
        frames = traceback.extract_tb(sys.exc_info()[2])
    else:  # pragma: no cover
        raise AssertionError("the original's check did not raise")
    ours = [f for f in frames if f.filename.startswith("<scoped_parallel.dispatch:")]
    assert len(ours) == 1 and "_sp_original" in (ours[0].line or ""), (
        f"the traceback shows our generated line: {[(f.filename, f.line) for f in frames]}"
    )
