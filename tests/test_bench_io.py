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
    assert r["requested_bytes"] == r["loads"] * r["record_bytes"]  # every load came back
    assert r["read_amplification"] is None or r["read_amplification"] >= 0


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


def test_latency_loader_against_bare_threads(packed, tmp_path, capsys):
    """One record at a time, through the loader workers and by bare threads: both read real
    records (the bare reads are checked against the store's crc32), and the text names both."""
    r = run_json(capsys, "--model", str(packed), "--workers", "1", "--threads", "2", "--latency")
    assert r["records"] == 60 and r["threads"] == 2 and r["direct"] is True
    assert r["loader_p50_ms"] > 0 and r["bare_p50_ms"] > 0
    assert abs(r["overhead_ms"] - (r["loader_p50_ms"] - r["bare_p50_ms"])) < 1e-9
    assert main(["bench", "io", "--model", str(packed), "--threads", "2", "--latency",
                 "--buffered"]) == 0
    out = capsys.readouterr().out
    assert "buffered" in out and "through loader workers" in out
    assert "bare threads" in out


def test_latency_bare_reads_are_checked(packed, tmp_path, monkeypatch):
    """A bare read that misses the record is an error, not a fast figure."""
    from flashmoe.errors import FlashMoeError
    from flashmoe.store import open_store

    store = open_store(packed)
    real, calls = store.checksum, []

    def checksum(layer, e):  # right for the loaders' records, wrong for the bare one's
        calls.append(1)
        return real(layer, e) if len(calls) % 2 else real(layer, e) ^ 1
    monkeypatch.setattr(store, "checksum", checksum)
    with pytest.raises(FlashMoeError, match="bare read of layer"):
        bench_io.one_at_a_time(store, 1, 2, False, bench_io._keys(store, None), records=2)
    store.close()
