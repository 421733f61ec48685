"""Originals for tests/test_dispatch_exact.py, in a module pytest does not rewrite.

(pytest rewrites ``assert`` in test modules, so a function there does not run the
code its source compiles to, and ``dispatching(exact=True)`` rightly declines to
inline it.)
"""

GLOBAL = {"value": None}


def reader(check=True, *, scale=1):
    """A Megatron-style getter: a module global, optionally checked."""
    if check:
        assert GLOBAL["value"] is not None, "not initialized"
    return GLOBAL["value"]


def positional(a, b=2, /, c=3):
    return ("orig", a, b, c)


def no_return(x=0):
    GLOBAL["seen"] = x
