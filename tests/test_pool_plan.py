"""What a memory budget buys: ``flashmoe inspect --memory-budget`` shows the engine's own plan."""

import json

import pytest

from flashmoe.cli import main
from flashmoe.synth import synth


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return synth(tmp_path_factory.mktemp("plan") / "m", "qwen3_moe", layout="mlx", bits=4)


def test_inspect_shows_the_plan_the_engine_makes(model, capsys, monkeypatch):
    from flashmoe.orchestrator.engine import Engine

    monkeypatch.setenv("FLASHMOE_WORKERS", "1")
    monkeypatch.setenv("FLASHMOE_IO_THREADS", "3")
    assert main(["inspect", str(model), "--memory-budget", "4MiB", "--json"]) == 0
    pool = json.loads(capsys.readouterr().out)["pool"]
    assert pool["staging_slots"] == 3  # one per I/O thread: prefetch is off on the CPU
    assert pool["pool_bytes"] <= 4 << 20
    with Engine(str(model), memory_budget="4MiB") as eng:
        assert eng.plan.cache_slots == pool["cache_slots"]
        assert eng.plan.staging_slots == pool["staging_slots"]
        assert eng.plan.nbytes == pool["pool_bytes"]
    assert main(["inspect", str(model), "--memory-budget", "4MiB"]) == 0
    out = capsys.readouterr().out
    assert f"cache slots:         {pool['cache_slots']}" in out and "staging slots:" in out


def test_inspect_rejects_a_bad_budget(model, capsys):
    assert main(["inspect", str(model), "--memory-budget", "lots"]) == 2
    assert "bad size" in capsys.readouterr().err
    assert main(["inspect", str(model), "--memory-budget", "1KiB"]) == 2
    assert "too small" in capsys.readouterr().err
