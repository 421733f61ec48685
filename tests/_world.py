"""A reusable multi-process gloo world for tests.

``World(n)`` spawns ``n`` processes once; they join a gloo process group on
127.0.0.1 and then wait for work. ``world.run(fn, *args)`` runs the module-level
function ``fn(rank, *args)`` on every rank (the worker imports ``fn``'s file by
path) and returns the per-rank results, or raises ``WorldError`` with every
failing rank's traceback. Each call has a deadline; a world that misses it is
killed, and the next call starts a fresh one. After each call every worker
checks that the function left no active scope and no live process group behind
(the same rules as ``scoped_parallel.testing``'s guard; no fixture holds groups in a
worker, so any live group is a leak). A leaked scope is reported once and forgotten.
"""

from __future__ import annotations

import contextlib
import importlib.util
import multiprocessing as mp
import os
import socket
import sys
import traceback
from datetime import timedelta
from typing import Any, Callable, Iterator

__all__ = ["World", "WorldError", "new_groups_destroyed"]


class WorldError(AssertionError):
    pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


_MODULES: dict[str, Any] = {}


def _load(path: str) -> Any:
    module = _MODULES.get(path)
    if module is None:
        name = "_world_fn_" + str(abs(hash(path)))
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        _MODULES[path] = module
    return module


def _worker(rank: int, size: int, port: int, conn: Any, env: dict[str, str]) -> None:
    os.environ.update(env)
    os.environ.update(
        {
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "RANK": str(rank),
            "WORLD_SIZE": str(size),
            "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": str(size),
        }
    )
    import torch
    import torch.distributed as dist

    # one intra-op thread per rank unless a run asks for more (make test-any-cpu uses 2)
    torch.set_num_threads(int(os.environ.get("SCOPED_PARALLEL_TEST_THREADS", "1")))
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=size,
        timeout=timedelta(seconds=60),
    )
    from scoped_parallel.groups import create as _groups
    from scoped_parallel.scope import _forget_all_scopes, active_states
    from scoped_parallel.groups.plan import reset_construction_count as _reset_agreement

    calls = 0

    conn.send(("ready", rank))
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            break
        if msg is None:
            break
        path, fn_name, args, kwargs = msg
        calls += 1
        _reset_agreement(f"call{calls}")  # a failed call must not desynchronise the next
        try:
            fn = getattr(_load(path), fn_name)
            result = fn(rank, *args, **kwargs)
            leaks = []
            if active_states():
                leaks.append(f"active scopes {active_states()!r}")
                _forget_all_scopes()  # reported once: the next call starts clean
            if _groups.live_groups():
                leaks.append(f"{_groups.live_groups()} live scoped_parallel process groups")
            if leaks:
                conn.send(("err", f"{fn_name} leaked " + " and ".join(leaks)))
            else:
                conn.send(("ok", result))
        except BaseException:  # report everything, keep serving
            conn.send(("err", traceback.format_exc()))
    try:
        dist.destroy_process_group()
    except Exception:
        pass


class World:
    """A pool of ``size`` processes sharing one gloo world (see module docstring)."""

    def __init__(self, size: int = 4, env: dict[str, str] | None = None) -> None:
        self.size = size
        self.env = dict(env or {})
        self._procs: list[Any] = []
        self._conns: list[Any] = []

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        port = _free_port()
        self._procs, self._conns = [], []
        for rank in range(self.size):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker, args=(rank, self.size, port, child, self.env), daemon=True)
            proc.start()
            self._procs.append(proc)
            self._conns.append(parent)
        for conn in self._conns:
            if not conn.poll(180):
                self.close()
                raise WorldError("the gloo world did not start within 180 s")
            conn.recv()

    def run(self, fn: Callable[..., Any], *args: Any, timeout: float = 120.0, **kwargs: Any) -> list[Any]:
        """Run ``fn(rank, *args, **kwargs)`` on every rank; return the results by rank."""
        if not self._procs or not all(p.is_alive() for p in self._procs):
            self.close()
            self._start()
        path = os.path.abspath(fn.__code__.co_filename)
        for conn in self._conns:
            conn.send((path, fn.__name__, args, kwargs))
        replies: list[Any] = []
        for rank, conn in enumerate(self._conns):
            if not conn.poll(timeout):
                self.close()
                raise WorldError(f"rank {rank} did not finish {fn.__name__} within {timeout} s (world killed)")
            replies.append(conn.recv())
        errors = [f"--- rank {r} ---\n{msg}" for r, (kind, msg) in enumerate(replies) if kind == "err"]
        if errors:
            raise WorldError(f"{fn.__name__} failed on {len(errors)} rank(s):\n" + "\n".join(errors))
        return [msg for _, msg in replies]

    def close(self) -> None:
        for conn in self._conns:
            try:
                conn.send(None)
            except Exception:
                pass
        for proc in self._procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)
        self._procs, self._conns = [], []


@contextlib.contextmanager
def new_groups_destroyed() -> Iterator[None]:
    """Destroy, at the end of the block, every process group created in it that is still alive.

    For a rank function's vanilla runs: Megatron's ``destroy_model_parallel`` forgets its
    groups without destroying them, and DeepSpeed keeps the expert and AutoTP groups it
    creates; each gloo group keeps its threads and sockets, so a world that ran a dozen
    vanilla layouts slowed every later test of the session about fivefold (measured: 21 s
    -> 141 s for tests/adapters/megatron/test_megatron_gpt.py after the Megatron matrix).
    Destroying a group is local (no collective), so ranks need not agree on the moment.
    """
    import torch.distributed as dist
    from torch.distributed import distributed_c10d as c10d

    before = set(c10d._world.pg_map)
    try:
        yield
    finally:
        for group in [g for g in list(c10d._world.pg_map) if g not in before]:
            dist.destroy_process_group(group)

