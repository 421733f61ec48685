"""Originals for tests/scope/test_dispatch_exact.py, in a module pytest does not rewrite (plain functions
whose failures are their own ``assert`` statements)."""

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
