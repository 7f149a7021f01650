"""``flashmoe bench io`` on a tiny packed store: one JSON object, sweeps, traces."""

import json

import pytest

from flashmoe import bench_io
from flashmoe.cli import main


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    from flashmoe.pack import pack
    from flashmoe.synth import synth

    d = tmp_path_factory.mktemp("bench")
    return pack(
        synth(d / "hf", "qwen3_moe", layout="hf", experts=8, layers=2), d / "p", progress=False
    )


def run_json(capsys, *argv) -> dict:
    assert main(["bench", "io", *argv, "--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1
    return json.loads(out[0])


def test_json_point(packed, capsys):
    r = run_json(
        capsys, "--model", str(packed), "--workers", "1", "--threads", "2", "--seconds", "0.3"
    )
    for k in ("gb_per_s", "p50_ms", "p99_ms", "workers", "threads", "direct"):
        assert k in r
    assert r["workers"] == 1 and r["threads"] == 2 and r["direct"] is True
    assert r["gb_per_s"] > 0 and r["loads"] > 0 and r["p99_ms"] >= r["p50_ms"] > 0


def test_sweep_plot_and_trace(packed, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(bench_io, "SWEEP", [(1, 1), (1, 2), (2, 1)])
    trace = tmp_path / "trace.jsonl"
    trace.write_text('{"layer": 0, "experts": [1, 2, 3]}\n{"layer": 1, "experts": [0, 7]}\n')
    plot = tmp_path / "io.png"
    r = run_json(
        capsys, "--model", str(packed), "--sweep", "--buffered", "--seconds", "0.2",
        "--trace", str(trace), "--plot", str(plot),
    )  # fmt: skip
    assert len(r["points"]) == 3 and r["direct"] is False
    assert r["gb_per_s"] == max(p["gb_per_s"] for p in r["points"])
    assert plot.stat().st_size > 1000


def test_bad_trace_is_a_clear_error(packed, tmp_path, capsys):
    trace = tmp_path / "bad.jsonl"
    trace.write_text('{"layer": 0}\n')
    assert main(["bench", "io", "--model", str(packed), "--trace", str(trace)]) == 2
    assert "bad.jsonl:1" in capsys.readouterr().err
