"""``flashmoe pack``: bit-exact copies, re-quantization, checksums, safe re-runs and bad input."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from flashmoe.cli import main
from flashmoe.errors import CheckpointError, ChecksumError
from flashmoe.outdir import MARKER
from flashmoe.pack import pack
from flashmoe.store import RECORD_ALIGN, Store, open_store
from flashmoe.synth import synth


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("src")
    kw = dict(layers=2, experts=8, topk=2, shard_size=300_000)
    return {
        "hf": synth(root / "q3-hf", "qwen3_moe", layout="hf", **kw),
        "fused": synth(root / "q35-hf", "qwen3_5_moe", layout="hf", **kw),
        "mlx": synth(root / "q3-mlx", "qwen3_moe", layout="mlx", **kw),
    }


def _bf16(a: np.ndarray) -> mx.array:
    return mx.array(a).view(mx.bfloat16)


def _u(x: mx.array) -> np.ndarray:
    return np.array(x.view(mx.uint16)) if x.dtype == mx.bfloat16 else np.array(x)


PAIRS = [(0, 0), (0, 5), (1, 7)]


@pytest.mark.parametrize("bits,group_size", [(2, 64), (3, 64), (4, 64), (8, 64), (4, 32)])
@pytest.mark.parametrize("which", ["hf", "fused"])
def test_requantize_hf(src, tmp_path, which, bits, group_size):
    s = open_store(src[which])
    p = open_store(
        pack(src[which], tmp_path / "p", bits=bits, group_size=group_size, progress=False)
    )
    assert p.quantization == {"group_size": group_size, "bits": bits, "mode": "affine"}
    assert [t.name for t in p.layout.tensors][:3] == [
        "gate_proj.weight", "gate_proj.scales", "gate_proj.biases",
    ]  # fmt: skip
    for layer, e in PAIRS:
        a, b = s.record_arrays(layer, e), p.record_arrays(layer, e)
        for proj in ("gate_proj", "up_proj", "down_proj"):
            w, sc, bi = mx.quantize(_bf16(a[f"{proj}.weight"]), group_size=group_size, bits=bits)
            assert np.array_equal(b[f"{proj}.weight"], _u(w))
            assert np.array_equal(b[f"{proj}.scales"], _u(sc))  # bf16, as the source
            assert np.array_equal(b[f"{proj}.biases"], _u(bi))


@pytest.mark.parametrize("bits", [2, 3, 8])
def test_requantize_mlx(src, tmp_path, bits):
    s = open_store(src["mlx"])
    p = open_store(pack(src["mlx"], tmp_path / "p", bits=bits, progress=False))
    for layer, e in PAIRS:
        a, b = s.record_arrays(layer, e), p.record_arrays(layer, e)
        for proj in ("gate_proj", "up_proj", "down_proj"):
            w = mx.dequantize(
                mx.array(a[f"{proj}.weight"]), _bf16(a[f"{proj}.scales"]),
                _bf16(a[f"{proj}.biases"]), group_size=64, bits=4,
            )  # fmt: skip
            ref = mx.quantize(w, group_size=64, bits=bits)
            for name, x in zip(("weight", "scales", "biases"), ref, strict=True):
                assert np.array_equal(b[f"{proj}.{name}"], _u(x)), (layer, e, proj, name)


def test_group_size_must_divide(src, tmp_path):
    # moe_intermediate_size 64: down_proj's input cannot take groups of 128
    with pytest.raises(CheckpointError, match="down_proj: input size 64 .* group size 128"):
        pack(src["hf"], tmp_path / "p", bits=4, group_size=128, progress=False)
    assert not (tmp_path / "p").exists() and not (tmp_path / "p.partial").exists()


def test_store_files_and_checksum(src, tmp_path):
    out = pack(src["mlx"], tmp_path / "p", progress=False)
    names = {f.name for f in out.iterdir()}
    assert {"config.json", "tokenizer.json", "tokenizer_config.json", "manifest.json"} <= names
    assert "generation_config.json" in names and "model.safetensors" in names
    assert "model.safetensors.index.json" not in names and not (tmp_path / "p.partial").exists()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == "flashmoe-packed" and manifest["source"]["kind"] == "mlx"
    store = open_store(out)
    stride = store.record_stride
    assert stride % RECORD_ALIGN == 0 and stride >= store.layout.nbytes
    for layer in store.moe_layers:
        f = out / manifest["files"][str(layer)]
        assert f.stat().st_size == store.num_experts * stride
    # flip one byte inside layer 1 expert 6's record
    ext = store.extents(1, 6)[0]
    with open(ext.path, "r+b") as f:
        f.seek(ext.offset + 100)
        byte = f.read(1)
        f.seek(ext.offset + 100)
        f.write(bytes([byte[0] ^ 0x01]))
    store = open_store(out)
    with pytest.raises(ChecksumError, match=r"layer 1 expert 6 of .*layer-001\.bin"):
        store.read_record(1, 6)
    store.read_record(1, 5)
    store.read_record(0, 6)


def test_repack_is_bit_exact(src, tmp_path):
    a = open_store(pack(src["fused"], tmp_path / "a", progress=False))
    b = open_store(pack(a.path, tmp_path / "b", progress=False))
    assert b.layout == a.layout
    for layer, e in PAIRS:
        assert b.read_record(layer, e) == a.read_record(layer, e)


def test_existing_out_and_force(src, tmp_path, capsys):
    out = tmp_path / "p"
    assert main(["pack", str(src["hf"]), str(out)]) == 0
    assert "MB/s" in capsys.readouterr().out
    assert main(["pack", str(src["hf"]), str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--force" in err and err.count("\n") == 1
    assert main(["pack", str(src["hf"]), str(out), "--force", "--bits", "8"]) == 0
    assert open_store(out).quantization["bits"] == 8
    assert not (tmp_path / "p.old").exists()


def test_bad_source_cli(tmp_path, capsys):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert main(["pack", str(tmp_path / "src"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "config.json" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def _refused(path: Path) -> None:
    with pytest.raises(CheckpointError):
        open_store(path)


def test_interrupted_pack_leaves_nothing_valid(src, tmp_path, monkeypatch):
    copy = tmp_path / "src"
    shutil.copytree(src["hf"], copy)
    out = tmp_path / "p"
    # the source loses its tail half-way through the pack
    shards = sorted(copy.glob("*.safetensors"))
    calls = {"n": 0}
    read_into = Store.read_into

    def truncating(self, layer, expert, buf):
        calls["n"] += 1
        if calls["n"] == 9:
            for f in shards:
                os.truncate(f, f.stat().st_size // 2)
        return read_into(self, layer, expert, buf)

    monkeypatch.setattr(Store, "read_into", truncating)
    with pytest.raises(CheckpointError, match="short read"):
        pack(copy, out, progress=False)
    assert not out.exists() and not (tmp_path / "p.partial").exists()
    monkeypatch.undo()
    # a truncated source is refused before anything is written
    with pytest.raises(CheckpointError, match="truncated"):
        pack(copy, out, progress=False)
    assert not out.exists() and not (tmp_path / "p.partial").exists()

    # what a killed pack leaves (a .partial dir, no manifest or only its temp file) never opens
    good = pack(src["hf"], tmp_path / "good", progress=False)
    partial = tmp_path / "x.partial"
    shutil.copytree(good, partial)
    os.replace(partial / "manifest.json", partial / "manifest.json.tmp")
    _refused(partial)
    (partial / "manifest.json.tmp").unlink()
    partial.rename(tmp_path / "x")
    _refused(tmp_path / "x")
    # a re-run over the leftovers of a killed pack (its marker comes first) succeeds
    (tmp_path / "y.partial").mkdir()
    (tmp_path / "y.partial" / MARKER).write_text("{}")
    (tmp_path / "y.partial" / "junk").write_text("x")
    y = pack(src["hf"], tmp_path / "y", progress=False)
    assert open_store(y).kind == "packed" and not (tmp_path / "y.partial").exists()
