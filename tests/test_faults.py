"""Faults a long-running service meets: killed loader workers, corrupt or truncated expert files,
a SIGKILLed daemon and its restart. Nothing may be lost and no wrong answer given silently.

Every test compares token ids with an undisturbed run; every wait has a deadline.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from support import (
    BUDGET,
    MAX_TOKENS,
    PROMPTS,
    SMALL_BUDGET,
    Daemon,
    WorkerKiller,
    leftovers,
    loader_workers,
    shm_segments,
    start_stop_cycles,
    wait_for,
)

from flashmoe.errors import LoadError
from flashmoe.protocol.client import DaemonNotRunning, RequestRejected, pid_alive

SHORT = "Hi"  # a prompt that routes to few experts (one token, one step)


def generate_ids(engine, prompt: str, max_tokens: int) -> list[int]:
    from flashmoe.orchestrator.engine import GenRequest

    req = GenRequest(id="t", prompt=prompt, max_tokens=max_tokens)
    return [t for c in engine.generate(req) for t in c.token_ids]


def routed(model: Path, prompt: str, max_tokens: int) -> set[tuple[int, int]]:
    """The (layer, expert) pairs a request routes to: the cache's keys after it ran alone on
    an engine whose cache holds every expert."""
    from flashmoe.orchestrator.engine import Engine

    with Engine(str(model), memory_budget=BUDGET, workers=1) as e:
        generate_ids(e, prompt, max_tokens)
        t = e.cache.table
        assert t.nslots >= e.store.num_experts * len(e.store.moe_layers)
        return {t.key_of(s) for s in range(t.nslots) if t.key_of(s) is not None}


def only_in_first(model: Path) -> tuple[int, int]:
    """An expert that PROMPTS[0] needs and SHORT does not."""
    a = routed(model, PROMPTS[0], MAX_TOKENS)
    b = routed(model, SHORT, 1)
    assert a - b, "PROMPTS[0] routes to no expert that SHORT misses"
    return min(a - b)


# -- 1. killed loader workers ---------------------------------------------------------------------


@pytest.mark.parametrize("prefetch", [False, True], ids=["demand", "prefetch"])
def test_killed_workers_lose_nothing(tiny_model: Path, prefetch: bool, monkeypatch) -> None:
    """A loader worker SIGKILLed on every token of a whole generation: same token ids, every
    lost load re-sent, each worker replaced by the supervisor; also with guesses in flight."""
    from flashmoe.orchestrator.engine import Engine, GenRequest

    if prefetch:
        monkeypatch.setenv("FLASHMOE_PREFETCH", "on")
    n = 16
    with Engine(str(tiny_model), memory_budget=SMALL_BUDGET, workers=2) as e:
        want = generate_ids(e, PROMPTS[0], n)
        assert e.cache.stats.misses > 4 * n  # nearly every token loads experts
    with Engine(str(tiny_model), memory_budget=SMALL_BUDGET, workers=2) as e:
        got = []
        with WorkerKiller(e.loader.workers_info) as k:
            for c in e.generate(GenRequest(id="k", prompt=PROMPTS[0], max_tokens=n)):
                got += c.token_ids
                k.poke()
        assert got == want
        assert generate_ids(e, PROMPTS[0], n) == want  # and the pool is whole afterwards
        wait_for(lambda: e.loader.poll(0.1) == []
                 and e.loader.restarts >= k.kills, 10,
                 "every killed worker to be replaced")  # fmt: skip
        assert k.kills >= n // 4 and e.loader.restarts == k.kills
        tracked = {w["pid"] for w in e.loader.workers_info() if w["state"] == "ready"}
        assert {p.pid for p in loader_workers(os.getpid())} == tracked  # none leaked
        assert e.loader.last_restart_s is not None and e.loader.last_restart_s < 10
        print(f"kills {k.kills}, restarts {e.loader.restarts}, "
              f"last replacement {e.loader.last_restart_s:.3f} s")  # fmt: skip


def test_dead_worker_of_an_idle_engine_is_replaced_without_a_request(tiny_model: Path) -> None:
    """The engine thread supervises the loader workers while it waits for requests: a worker
    killed while nothing runs is back before the next request needs it."""
    from flashmoe.orchestrator.engine import Engine

    with Engine(str(tiny_model), memory_budget=SMALL_BUDGET, workers=2) as e:
        e.start()
        pid = e.loader.workers_info()[0]["pid"]
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: e.loader.restarts == 1
                 and all(w["state"] == "ready" for w in e.loader.workers_info()), 10,
                 "the idle engine to replace its dead worker")  # fmt: skip
        assert pid not in {w["pid"] for w in e.loader.workers_info()}
        assert {p.pid for p in loader_workers(os.getpid())} == {
            w["pid"] for w in e.loader.workers_info()}


_KILLED_AFTER_HELLO = """
import os, signal, sys, time
from flashmoe.shm.pool import ExpertPool
from flashmoe.orchestrator.loaders import LoaderPool
path = sys.argv[1]
pool = ExpertPool.create(4, 16384)
lp = LoaderPool(pool, workers=1, threads=1)
try:
    (w,) = lp.workers_info()
    os.kill(w["pid"], signal.SIGKILL)
    time.sleep(0.3)
    lp.poll(0)  # the death is noticed: a replacement starts
    (w,) = lp.workers_info()
    assert w["state"] == "starting", w
    rids = [lp.submit(i, [[path, 0, 16384, 0]]) for i in range(4)]  # no worker: backlog
    lp._sock.poll(20000)  # the replacement's Hello is waiting, unread
    os.kill(w["pid"], signal.SIGKILL)  # and it dies before its first request reaches it
    time.sleep(0.5)
    done, t0 = [], time.monotonic()
    while len(done) < 4 and time.monotonic() - t0 < 30:
        done += lp.poll(1.0)
    assert sorted(c.req for c in done if c.ok) == sorted(rids), done
    print("restarts", lp.restarts)
finally:
    lp.close()
    pool.close()
    pool.unlink()
"""


def test_worker_killed_between_hello_and_first_request(tmp_path: Path) -> None:
    """The backlog goes to a replacement that says hello and dies at once: the coordinator
    used to spin forever re-queueing the backlog (in a subprocess here, so it cannot hang)."""
    data = tmp_path / "record.bin"
    data.write_bytes(os.urandom(16384))
    out = subprocess.run([sys.executable, "-c", _KILLED_AFTER_HELLO, str(data)],
                         capture_output=True, text=True, timeout=90)  # fmt: skip
    assert out.returncode == 0 and "restarts 2" in out.stdout, out.stderr[-2000:]


# -- 2. corrupt and truncated expert files --------------------------------------------------------


def _copy(model: Path, tmp_path: Path) -> Path:
    dst = tmp_path / model.name
    shutil.copytree(model, dst)
    return dst


def test_corrupt_expert_in_a_running_daemon(packed_model: Path, tmp_path: Path) -> None:
    """A flipped byte in one packed record: the request that needs it fails naming layer,
    expert and file; the daemon stays up, serves others, and serves it again once repaired."""
    from flashmoe.store import open_store

    model = _copy(packed_model, tmp_path)
    layer, expert = only_in_first(model)
    (ext,) = open_store(model).extents(layer, expert)
    d = Daemon(model)
    try:
        d.wait_ready()
        with d.client() as c:
            want_short = c.generate(SHORT, max_tokens=1).token_ids
            with open(ext.path, "r+b") as f:
                f.seek(ext.offset + ext.length // 2)
                byte = f.read(1)
                f.seek(-1, os.SEEK_CUR)
                f.write(bytes([byte[0] ^ 0xFF]))
            with pytest.raises(RequestRejected) as info:
                c.generate(PROMPTS[0], max_tokens=MAX_TOKENS)
            msg = str(info.value)
            assert info.value.code == "engine_error"
            assert f"layer {layer} expert {expert}:" in msg, msg
            assert "checksum" in msg and Path(ext.path).name in msg, msg
            assert c.generate(SHORT, max_tokens=1).token_ids == want_short
            with open(ext.path, "r+b") as f:
                f.seek(ext.offset + ext.length // 2)
                f.write(byte)
            r = c.generate(PROMPTS[0], max_tokens=MAX_TOKENS)
            assert c.status()["pid"] == d.proc.pid
        return_ids = r.token_ids
    finally:
        d.close()
    from flashmoe.orchestrator.engine import Engine

    with Engine(str(model), memory_budget=BUDGET, workers=1) as e:
        assert return_ids == generate_ids(e, PROMPTS[0], MAX_TOKENS)


@pytest.mark.parametrize("kind", ["packed", "mlx"])
def test_truncated_file_after_start(
    kind: str, tiny_model: Path, packed_model: Path, tmp_path: Path
) -> None:
    """A packed layer file or an mlx shard cut short while the engine runs: a clear error
    naming the file, never garbage; the same request is right again once the file is back."""
    from flashmoe.orchestrator.engine import Engine

    model = _copy(packed_model if kind == "packed" else tiny_model, tmp_path)
    layer, expert = only_in_first(model)
    with Engine(str(model), memory_budget=SMALL_BUDGET, workers=1) as e:
        exts = e.store.extents(layer, expert)
        path = Path(exts[0].path)
        data = path.read_bytes()
        want = generate_ids(e, PROMPTS[0], MAX_TOKENS)
        os.truncate(path, min(x.offset for x in exts) + 1)
        with pytest.raises(LoadError, match=re.escape(f"short read: {path}")):
            generate_ids(e, PROMPTS[0], MAX_TOKENS)
        with open(path, "r+b") as f:  # same inode: the workers keep their open descriptors
            f.write(data)
        assert generate_ids(e, PROMPTS[0], MAX_TOKENS) == want


@pytest.mark.parametrize(
    "fault",
    ["flipped byte, packed", "truncated, packed", "truncated, mlx", "flipped byte, deferred"],
)
def test_load_error_names_layer_expert_and_file(
    fault: str, tiny_model: Path, packed_model: Path, tmp_path: Path, monkeypatch
) -> None:
    from flashmoe.orchestrator.engine import Engine
    from flashmoe.orchestrator.streamed import use_path

    model = _copy(tiny_model if "mlx" in fault else packed_model, tmp_path)
    layer, expert = only_in_first(model)
    with Engine(str(model), memory_budget=SMALL_BUDGET, workers=1) as e:
        if "deferred" in fault:  # the GPU pipeline: the bad load is found by the next bank
            use_path(e.banks, "deferred")
        exts = e.store.extents(layer, expert)
        path = Path(exts[0].path)
        start = min(x.offset for x in exts)
        if "flipped" in fault:
            with open(path, "r+b") as f:
                f.seek(start + exts[0].length // 2)
                byte = f.read(1)
                f.seek(-1, os.SEEK_CUR)
                f.write(bytes([byte[0] ^ 0xFF]))
        else:
            os.truncate(path, start + 1)
        with pytest.raises(LoadError) as info:
            generate_ids(e, PROMPTS[0], MAX_TOKENS)
    msg = str(info.value)
    assert path.name in msg and ("checksum" if "flipped" in fault else "short read") in msg, msg
    if "flipped" in fault:
        assert f"layer {layer} expert {expert}:" in msg, msg
    else:  # the first record past the cut may be another expert of the file
        assert "layer " in msg and " expert " in msg, msg


def test_corrupt_guess_fails_the_layer_that_asks_for_it(packed_model: Path, tmp_path: Path) -> None:
    """A prefetched record with a flipped byte fails unseen; the layer that then asks for that
    expert gets the checksum error naming it, and asking again reads it again."""
    from flashmoe.orchestrator.engine import Engine

    model = _copy(packed_model, tmp_path)
    with Engine(str(model), memory_budget=SMALL_BUDGET, workers=1) as e:
        cache = e.cache
        layer = e.store.moe_layers[-1]
        expert = next(x for x in range(e.store.num_experts)
                      if cache.table.lookup((layer, x)) is None)
        ext = e.store.extents(layer, expert)[0]
        with open(ext.path, "r+b") as f:
            f.seek(ext.offset + ext.length // 2)
            byte = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte[0] ^ 0xFF]))
        lane = cache.lane
        assert cache.prefetch.guess(lane, [(layer, expert)]) == 1
        assert cache.stats.prefetched == 1
        for _ in range(2):
            h = cache.request(layer, [expert])
            try:
                with pytest.raises(LoadError, match=f"layer {layer} expert {expert}: checksum"):
                    h.wait()
            finally:
                h.release()
        assert cache.stats.prefetch_used == 1 and cache.table.lookup((layer, expert)) is None


# -- 4. crash and restart ---------------------------------------------------------------------


def test_orphan_workers_exit_when_the_coordinator_dies_during_their_start(tmp_path: Path) -> None:
    """The coordinator dies right after spawning its workers, before they said hello."""
    code = (
        "import os\n"
        "from flashmoe.shm.pool import ExpertPool\n"
        "from flashmoe.orchestrator.loaders import LoaderPool\n"
        "def die(self, workers):\n"
        "    print(pool.name, *[w.proc.pid for w in workers], flush=True)\n"
        "    os._exit(9)\n"
        "LoaderPool._wait_ready = die\n"
        "pool = ExpertPool.create(2, 16384)\n"
        "LoaderPool(pool, workers=2, threads=1)\n"
    )
    out = tmp_path / "out.txt"
    with open(out, "w") as f:  # a file, not a pipe: the workers inherit it
        subprocess.run([sys.executable, "-c", code], stdout=f, timeout=60)
    name, *pids = out.read_text().split()
    pids = [int(p) for p in pids]
    try:
        deadline = time.monotonic() + 15
        while any(pid_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(pid_alive(p) for p in pids), "orphaned loader workers still running"
    finally:
        for p in pids:
            if pid_alive(p):
                os.kill(p, signal.SIGKILL)
        from flashmoe.shm.pool import cleanup_stale

        cleanup_stale()


@pytest.mark.serial
def test_sigkilled_daemon_restarts_clean(tiny_model: Path, runtime_dir: Path) -> None:
    """SIGKILL the daemon mid-request: the client raises at once, the dead daemon's workers
    exit by themselves, the next start removes its shared memory, sockets and pid file."""
    d = Daemon(tiny_model)
    dead = d.proc.pid
    d2 = None
    try:
        d.wait_ready()
        assert list(runtime_dir.glob(f"loaders-{dead}-*.sock"))
        assert runtime_dir.stat().st_mode & 0o777 == 0o700
        workers = loader_workers(dead)
        assert workers and shm_segments(dead)
        errors: list[BaseException] = []

        def blocked() -> None:
            try:
                with d.client(timeout=60) as c:
                    c.generate(PROMPTS[1], max_tokens=200)
            except BaseException as e:
                errors.append(e)

        t = threading.Thread(target=blocked)
        t.start()
        with d.client(timeout=60) as c:
            stream = c.generate(PROMPTS[0], max_tokens=200, stream=True)
            next(stream)
            d.proc.send_signal(signal.SIGKILL)
            t0 = time.monotonic()
            with pytest.raises(DaemonNotRunning):
                for _ in stream:
                    pass
            assert time.monotonic() - t0 < 5
        t.join(10)
        assert not t.is_alive() and errors and type(errors[0]) is DaemonNotRunning
        d.proc.wait(10)
        wait_for(lambda: not loader_workers(dead), 10, "the dead daemon's workers to exit")
        assert shm_segments(dead) and d.paths.pid.exists()  # what a SIGKILL leaves
        d2 = Daemon(tiny_model, sock=d.socket)
        d2.wait_ready()
        assert not shm_segments(dead)
        assert not list(runtime_dir.glob(f"loaders-{dead}-*.sock"))
        with d2.client() as c:
            assert c.generate(PROMPTS[0], max_tokens=4).finish_reason in ("length", "stop")
        new = d2.proc.pid
        assert d2.stop() == 0
        assert not shm_segments(new) and not loader_workers(new)
        assert leftovers(runtime_dir, d.dir) == []
    finally:
        if d2 is not None:
            d2.close()
        d.close()


def test_start_stop_cycles_leave_nothing(tiny_model: Path, runtime_dir: Path) -> None:
    took = start_stop_cycles(tiny_model, runtime_dir, 2)
    print(f"start+stop: {', '.join(f'{t:.2f}' for t in took)} s")
