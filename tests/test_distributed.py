"""Pipeline stages over mx.distributed: two ranks started by mlx.launch on loopback (the ring
backend) against one process on the same checkpoint, a refused architecture, and a rank killed
or frozen mid-request."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from support import free_port, loader_workers, shm_segments, wait_for

PY = sys.executable
LAUNCH = str(Path(PY).parent / "mlx.launch")
BUDGET = "64MiB"
PROMPT = "the quick brown fox"
TOKENS = 12


def launch(args: list[str], **kw) -> subprocess.Popen:
    """Two ranks of ``args`` (a Python module and its arguments) on loopback."""
    cmd = [LAUNCH, "-n", "2", "--backend", "ring", "-p", str(free_port()), "--", PY, *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def run_args(model: Path, *extra: str) -> list[str]:
    return ["-m", "flashmoe.cli", "run", "--model", str(model), "--prompt", PROMPT,
            "--memory-budget", BUDGET, "--workers", "1", *extra]


@functools.cache
def single(model: Path, *extra: str) -> dict:
    out = subprocess.run([PY, *run_args(model, "--json", "--max-tokens", str(TOKENS), *extra)],
                         capture_output=True, text=True, timeout=120, check=True)
    return json.loads(out.stdout)


def ranks_of(launcher: subprocess.Popen) -> dict[int, psutil.Process]:
    found = {}
    for c in psutil.Process(launcher.pid).children(recursive=True):
        try:
            if c.cmdline()[1:3] in (["-m", "flashmoe.cli"], ["-m", "flashmoe.orchestrator.daemon"]):
                found[int(c.environ()["MLX_RANK"])] = c
        except (psutil.Error, KeyError):
            pass
    return found if len(found) == 2 else {}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    from flashmoe.synth import synth

    root = tmp_path_factory.mktemp("dist")
    return {arch: synth(root / arch, arch, layout="mlx", bits=4)
            for arch in ("qwen3_moe", "deepseek_v3", "glm4_moe", "mixtral")}


@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v3", "glm4_moe"])
def test_two_ranks_give_the_tokens_of_one_process(models, arch, runtime_dir):
    want = single(models[arch])
    p = launch(run_args(models[arch], "--distributed", "--json", "--max-tokens", str(TOKENS)))
    out, err = p.communicate(timeout=180)
    got = json.loads(out)
    assert got["token_ids"] == want["token_ids"], err.decode()[-2000:]
    assert got["text"] == want["text"]
    ranks = got["stats"]["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1]
    assert ranks[0]["layers"][0] == ranks[1]["layers"][1]  # rank 1 runs the first layers
    assert all(r["bytes_read"] > 0 and r["budget_bytes"] == 64 << 20 for r in ranks)
    assert sum(r["expert_hits"] + r["expert_misses"] for r in ranks) == \
        want["stats"]["expert_hits"] + want["stats"]["expert_misses"]
    assert not list(runtime_dir.glob("*.sock"))


@pytest.mark.slow
def test_an_uneven_split_gives_the_same_tokens(models, runtime_dir):
    want = single(models["qwen3_moe"])
    p = launch(run_args(models["qwen3_moe"], "--distributed", "--split", "3,1", "--json",
                        "--max-tokens", str(TOKENS)))
    out, err = p.communicate(timeout=180)
    got = json.loads(out)
    assert got["token_ids"] == want["token_ids"], err.decode()[-2000:]
    assert [r["layers"] for r in got["stats"]["ranks"]] == [[1, 4], [0, 1]]


DRIVER = """
import json, sys
from flashmoe.orchestrator.distributed import join
from flashmoe.orchestrator.engine import Engine, GenRequest
stage = join()
with Engine(sys.argv[1], memory_budget="64MiB", workers=1, stage=stage) as engine:
    if stage.rank:
        stage.follow(engine)
    else:
        for stop in ([sys.argv[2]], None):
            req = GenRequest(id="r", prompt=sys.argv[3], max_tokens=int(sys.argv[4]), stop=stop)
            chunks = list(engine.generate(req))
            print(json.dumps({"ids": [t for c in chunks for t in c.token_ids],
                              "finish": chunks[-1].finish_reason}), flush=True)
"""


def test_a_stop_string_ends_every_rank_in_step(models, runtime_dir):
    """Rank 0 stops mid-sequence (after the next step was queued); the followers stop with it
    and the next request is served in step."""
    model = models["qwen3_moe"]
    want = single(model)
    text = want["text"]
    stop = next(text[i:i + 2] for i in range(len(text) // 2, len(text) - 1)
                if text[i:i + 2].strip() and text.find(text[i:i + 2]) == i)
    p = launch(["-c", DRIVER, str(model), stop, PROMPT, str(TOKENS)])
    out, err = p.communicate(timeout=180)
    lines = [json.loads(x) for x in out.decode().splitlines() if x.startswith("{")]
    assert len(lines) == 2, err.decode()[-2000:]
    stopped, full = lines
    assert stopped["finish"] == "stop"
    assert 0 < len(stopped["ids"]) < TOKENS
    assert stopped["ids"] == want["token_ids"][:len(stopped["ids"])]
    assert full["ids"] == want["token_ids"]


def test_an_architecture_without_pipeline_support_is_refused(models, runtime_dir):
    p = launch(run_args(models["mixtral"], "--distributed", "--max-tokens", "2"))
    _, err = p.communicate(timeout=120)
    err = err.decode()
    assert "error: mixtral: mlx-lm has no pipeline support" in err
    assert "exited with code 2" in err
    assert "Traceback" not in err


def test_distributed_needs_a_group(models):
    p = subprocess.run([PY, *run_args(models["qwen3_moe"], "--distributed")],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == [
        "error: --distributed needs a group of 2 or more processes: start them with mlx.launch "
        "(e.g. mlx.launch -n 2 --backend ring -- flashmoe run --distributed ...)"]


def _mid_request(model: Path, env: dict) -> tuple[subprocess.Popen, dict]:
    """Two ranks decoding a long request, once text has streamed."""
    p = launch(run_args(model, "--distributed", "--max-tokens", "1400"),
               env={**os.environ, **env})
    os.set_blocking(p.stdout.fileno(), False)
    out = b""
    deadline = time.monotonic() + 120
    while len(out) < 8 and time.monotonic() < deadline and p.poll() is None:
        time.sleep(0.05)
        out += p.stdout.read() or b""
    try:
        return p, wait_for(lambda: ranks_of(p), 10, "both ranks")
    except BaseException:
        _end(p)
        raise


def _nothing_left(ranks: dict, runtime_dir: Path) -> None:
    for r in ranks.values():
        assert not shm_segments(r.pid)
        # a killed rank's loaders see their parent gone at their next poll (200 ms)
        wait_for(lambda r=r: not loader_workers(r.pid), 10, "the loaders to exit")
        assert not r.is_running() or r.status() == psutil.STATUS_ZOMBIE
    assert not list(runtime_dir.glob("*.sock"))


@pytest.mark.parametrize("victim", [1, pytest.param(0, marks=pytest.mark.slow)])
def test_a_killed_rank_ends_the_others_and_leaves_nothing(models, runtime_dir, victim):
    p, ranks = _mid_request(models["qwen3_moe"], {})
    try:
        ranks[victim].send_signal(signal.SIGKILL)
        _, err = p.communicate(timeout=60)  # never a hang: the others end, with or without MLX
    finally:
        _end(p)
    assert f"Node with rank {victim} exited with code -9" in err.decode()
    _nothing_left(ranks, runtime_dir)


def test_a_frozen_rank_is_caught_by_the_watchdog(models, runtime_dir):
    """SIGSTOP keeps the peer's sockets open: only the watchdog can tell."""
    p, ranks = _mid_request(models["qwen3_moe"], {"FLASHMOE_DISTRIBUTED_TIMEOUT_S": "2"})
    ranks[1].send_signal(signal.SIGSTOP)
    try:
        wait_for(lambda: not ranks[0].is_running() or ranks[0].status() == "zombie", 60,
                 "rank 0 to give up")
        ranks[1].send_signal(signal.SIGCONT)
        _, err = p.communicate(timeout=60)
    finally:
        with contextlib.suppress(psutil.Error):
            ranks[1].send_signal(signal.SIGCONT)
        _end(p)
    assert "error: rank 0" in err.decode() and "made no step in 2 s" in err.decode()
    _nothing_left(ranks, runtime_dir)


def _end(p: subprocess.Popen) -> None:
    """After a failed test: SIGTERM the ranks (killing mlx.launch would orphan them)."""
    if p.poll() is None:
        for r in ranks_of(p).values():
            r.terminate()
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            for r in ranks_of(p).values():
                r.kill()
            p.kill()


def _daemon(model: Path, sock: Path) -> tuple[subprocess.Popen, dict]:
    from flashmoe.protocol.client import Client

    p = launch(["-m", "flashmoe.orchestrator.daemon", "start", "--distributed", "--model",
                str(model), "--socket", str(sock), "--memory-budget", BUDGET, "--workers", "1"])

    def status():
        assert p.poll() is None, p.communicate()[1].decode()[-2000:]
        try:
            with Client(sock, timeout=2.0) as c:
                return c.status()
        except Exception:
            return None

    try:
        return p, wait_for(status, 120, "the daemon")
    except BaseException:
        _end(p)
        raise


def test_the_daemon_serves_across_two_ranks(models, runtime_dir):
    from flashmoe.orchestrator.status_table import rows
    from flashmoe.protocol.client import Client

    model = models["qwen3_moe"]
    want = single(model)
    sock = runtime_dir.parent / "d.sock"
    p, st = _daemon(model, sock)
    try:
        assert [r["layers"] for r in st["ranks"]] == [[2, 4], [0, 2]]
        with Client(sock, timeout=60) as c:
            assert c.generate(PROMPT, max_tokens=TOKENS).token_ids == want["token_ids"]
            assert c.generate(PROMPT, max_tokens=TOKENS).token_ids == want["token_ids"]
            st = c.status()
        assert all(r["bytes_read"] > 0 for r in st["ranks"])
        assert [what for what, _ in rows(st)][-2:] == ["rank 0", "rank 1"]
        with Client(sock, timeout=10) as c:
            c.shutdown()
        _, err = p.communicate(timeout=60)
    finally:
        _end(p)
    assert "exited with code" not in err.decode()  # every rank ended cleanly
    assert not list(runtime_dir.glob("*.sock")) and not sock.exists()


def test_a_killed_rank_fails_the_daemon_request_with_an_error(models, runtime_dir):
    from flashmoe.protocol.client import Client, ClientError

    sock = runtime_dir.parent / "d.sock"
    p, _ = _daemon(models["qwen3_moe"], sock)
    try:
        ranks = wait_for(lambda: ranks_of(p), 10, "both ranks")
        with Client(sock, timeout=60) as c, pytest.raises(ClientError, match="rank|daemon"):
            for i, _ in enumerate(c.generate(PROMPT, max_tokens=1400, stream=True)):
                if i == 4:
                    ranks[1].send_signal(signal.SIGKILL)
        p.communicate(timeout=60)
    finally:
        _end(p)
    _nothing_left(ranks, runtime_dir)
    assert not sock.exists()
