"""The store index against mlx-lm's own loading, for every architecture and store kind."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.utils import load_model

from flashmoe.cli import main
from flashmoe.errors import CheckpointError
from flashmoe.pack import pack
from flashmoe.store import RECORD_ALIGN, TENSOR_ALIGN, open_store
from flashmoe.synth import synth

ARCHS = ["qwen3_moe", "qwen3_5_moe", "deepseek_v3", "mixtral"]
KINDS = ["hf", "mlx", "hf-packed", "mlx-packed"]
EXPERTS = 8
PROJS = ("gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[tuple[str, str], Path]:
    root = tmp_path_factory.mktemp("models")
    out = {}
    for arch in ARCHS:
        for layout in ("hf", "mlx"):
            # small shards so that experts of one layer spread over several files
            src = synth(
                root / f"{arch}-{layout}", arch, layout=layout, layers=3, experts=EXPERTS,
                topk=2, shard_size=300_000,
            )  # fmt: skip
            out[(arch, layout)] = src
            out[(arch, f"{layout}-packed")] = pack(src, root / f"{arch}-{layout}-p", progress=False)
    return out


def _u(x: mx.array) -> np.ndarray:
    return np.array(x.view(mx.uint16)) if x.dtype == mx.bfloat16 else np.array(x)


def _module(model, path: str):
    m = model
    for p in path.split("."):
        m = m[int(p)] if p.isdigit() else getattr(m, p)
    return m


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("arch", ARCHS)
def test_records_equal_mlx_lm(models, arch, kind):
    source = models[(arch, kind.split("-")[0])]
    store = open_store(models[(arch, kind)])
    assert store.kind == ("packed" if kind.endswith("packed") else kind)
    model, _ = load_model(source, lazy=True)
    layers = store.moe_layers
    pairs = [(layers[0], 0), (layers[0], 3), (layers[len(layers) // 2], EXPERTS // 2)]
    pairs += [(layers[-1], e) for e in range(EXPERTS)]  # incl. the last expert of the last layer
    for layer, e in pairs:
        bank = _module(model, store.bank_path(layer))
        arrays = store.record_arrays(layer, e)
        assert set(arrays) == {t.name for t in store.layout.tensors}
        for name, got in arrays.items():
            proj, attr = name.split(".")
            want = _u(getattr(getattr(bank, proj), attr)[e])
            assert got.dtype == want.dtype and got.shape == want.shape, (layer, e, name)
            assert np.array_equal(got, want), (layer, e, name)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("arch", ARCHS)
def test_extents_and_layout(models, arch, kind):
    store = open_store(models[(arch, kind)])
    lay = store.layout
    assert all(t.offset % TENSOR_ALIGN == 0 for t in lay.tensors)
    assert lay.nbytes == lay.tensors[-1].offset + lay.tensors[-1].nbytes
    names = [t.name for t in lay.tensors]
    assert names[:1] == ["gate_proj.weight"] and "down_proj.weight" in names
    if kind.startswith("mlx"):
        assert store.quantization == {"group_size": 64, "bits": 4, "mode": "affine"}
        assert len(names) == 9
    else:
        assert store.quantization is None and len(names) == 3
    for layer in store.moe_layers:
        for e in range(store.num_experts):
            exts = store.extents(layer, e)
            for x in exts:
                assert os.path.isabs(x.path)
                assert x.offset + x.length <= os.path.getsize(x.path)
                assert x.dest + x.length <= lay.nbytes
            if kind.endswith("packed"):
                assert len(exts) == 1 and exts[0].offset % RECORD_ALIGN == 0
                assert store.checksum(layer, e) is not None
            else:
                assert len(exts) == len(names)
                assert [(x.dest, x.length) for x in exts] == [
                    (t.offset, t.nbytes) for t in lay.tensors
                ]
                assert store.checksum(layer, e) is None
    with pytest.raises(IndexError):
        store.extents(store.moe_layers[-1], store.num_experts)


def test_moe_layers_and_config(models):
    ds = open_store(models[("deepseek_v3", "hf")])
    k = ds.config["first_k_dense_replace"]
    assert k >= 1 and ds.moe_layers == list(range(k, 3))
    assert open_store(models[("mixtral", "mlx")]).moe_layers == [0, 1, 2]
    q35 = open_store(models[("qwen3_5_moe", "hf")])
    assert q35.bank_path(0) == "language_model.model.layers.0.mlp.switch_mlp"
    assert q35.top_k == 2 and q35.num_experts == EXPERTS


@pytest.mark.parametrize("arch", ARCHS)
def test_packed_is_bit_exact_and_dense_loads(models, arch):
    for layout in ("hf", "mlx"):
        src, packed = (
            open_store(models[(arch, layout)]),
            open_store(models[(arch, f"{layout}-packed")]),
        )
        assert packed.layout == src.layout and packed.quantization == src.quantization
        assert packed.moe_layers == src.moe_layers and packed.dense_bytes() == src.dense_bytes()
        for layer in src.moe_layers:
            for e in range(src.num_experts):
                assert packed.read_record(layer, e) == src.read_record(layer, e)
        # the dense weights load through mlx-lm from the packed dir exactly as from the source
        a, _ = load_model(src.dense_dir, lazy=True)
        b, _ = load_model(packed.dense_dir, lazy=True, strict=False)
        pa = {k: v for k, v in tree_flatten(a.parameters()) if "switch_mlp" not in k}
        pb = {k: v for k, v in tree_flatten(b.parameters()) if "switch_mlp" not in k}
        assert pa.keys() == pb.keys()
        for k in pa:
            assert np.array_equal(_u(pa[k]), _u(pb[k])), k


def test_inspect_cli(models, capsys):
    p = models[("qwen3_moe", "mlx-packed")]
    assert main(["inspect", str(p), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["kind"] == "packed" and d["model_type"] == "qwen3_moe"
    assert d["moe_layers"] == 3 and d["experts_per_layer"] == EXPERTS
    assert d["experts_per_token"] == 2 and d["quantization"]["bits"] == 4
    assert d["expert_bytes_total"] > 0 and d["dense_bytes"] > 0
    assert main(["inspect", str(models[("mixtral", "hf")])]) == 0
    text = capsys.readouterr().out
    assert "architecture:" in text and "mixtral" in text and "experts per token:" in text


# --- bad input -----------------------------------------------------------------------------------


def _copy(models, tmp_path, arch, layout) -> Path:
    dst = tmp_path / f"{arch}-{layout}"
    shutil.copytree(models[(arch, layout)], dst)
    return dst


def _edit_config(path: Path, **changes) -> None:
    cfg = json.loads((path / "config.json").read_text())
    target = cfg.get("text_config", cfg)
    for k, v in changes.items():
        (cfg if k == "model_type" else target)[k] = v
    (path / "config.json").write_text(json.dumps(cfg))


def _shard_with(path: Path, needle: str) -> Path:
    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    return path / next(f for k, f in sorted(index.items()) if needle in k)


def _expect_error(path: Path, match: str, capsys) -> None:
    with pytest.raises(CheckpointError, match=match):
        open_store(path)
    assert main(["inspect", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err


def test_unknown_architecture(models, tmp_path, capsys):
    p = _copy(models, tmp_path, "qwen3_moe", "hf")
    _edit_config(p, model_type="llama")
    _expect_error(p, r"model_type 'llama' has no routed experts in mlx-lm", capsys)
    _edit_config(p, model_type="no_such_model")
    _expect_error(p, r"mlx-lm cannot build this model .*no_such_model not supported", capsys)


def test_missing_shard(models, tmp_path, capsys):
    p = _copy(models, tmp_path, "mixtral", "hf")
    shard = _shard_with(p, "layers.2.")
    shard.unlink()
    _expect_error(p, f"missing shard .*{shard.name}", capsys)


def test_truncated_shard(models, tmp_path, capsys):
    p = _copy(models, tmp_path, "qwen3_5_moe", "mlx")
    shard = _shard_with(p, "layers.1.mlp.switch_mlp")
    os.truncate(shard, shard.stat().st_size - 10)
    _expect_error(p, f"{shard.name} is truncated", capsys)


@pytest.mark.parametrize(
    "arch,layout,change,match",
    [
        ("qwen3_moe", "hf", {"num_experts": 4}, r"experts\.4\..*config.json says 4 experts"),
        ("qwen3_moe", "hf", {"num_experts": 12}, r"missing expert tensor .*experts\.8\."),
        ("qwen3_moe", "mlx", {"num_experts": 4}, r"switch_mlp.*has shape \[8, .* says 4 experts"),
        ("deepseek_v3", "hf", {"moe_intermediate_size": 32}, r"has shape \[128, 64\].*\[128, 32\]"),
        ("qwen3_5_moe", "hf", {"hidden_size": 64}, r"gate_up_proj has shape"),
        ("mixtral", "mlx", {"intermediate_size": 128}, r"has shape"),
        ("deepseek_v3", "mlx", {"first_k_dense_replace": 0}, "missing expert tensors for layer 0"),
    ],
)
def test_config_disagrees_with_tensors(models, tmp_path, capsys, arch, layout, change, match):
    p = _copy(models, tmp_path, arch, layout)
    _edit_config(p, **change)
    _expect_error(p, match, capsys)


def _drop_tensors(path: Path, needle: str) -> None:
    for shard in sorted(path.glob("*.safetensors")):
        tensors = mx.load(str(shard))
        kept = {k: v for k, v in tensors.items() if needle not in k}
        if len(kept) != len(tensors):
            mx.save_safetensors(str(shard), kept)


def test_missing_expert_tensors(models, tmp_path, capsys):
    p = _copy(models, tmp_path, "qwen3_moe", "mlx")
    _drop_tensors(p, "layers.1.mlp.switch_mlp")
    _expect_error(p, "missing expert tensors for layer 1", capsys)
    p = _copy(models, tmp_path, "deepseek_v3", "hf")
    _drop_tensors(p, "layers.2.mlp.experts.5.up_proj")
    _expect_error(p, r"missing expert tensor model\.layers\.2\.mlp\.experts\.5\.up_proj", capsys)


def test_incomplete_packed_store_is_refused(models, tmp_path, capsys):
    p = _copy(models, tmp_path, "qwen3_moe", "hf-packed")
    (p / "manifest.json").unlink()
    _expect_error(p, "incomplete packed store", capsys)
    p = _copy(models, tmp_path, "mixtral", "mlx-packed")
    layer_file = next((p / "experts").iterdir())
    os.truncate(layer_file, layer_file.stat().st_size - RECORD_ALIGN)
    _expect_error(p, f"{layer_file.name} is truncated", capsys)


def test_per_module_quantization_overrides(models, tmp_path, capsys):
    p = _copy(models, tmp_path, "mixtral", "mlx")
    cfg = json.loads((p / "config.json").read_text())
    banks = [f"model.layers.{i}.block_sparse_moe.switch_mlp" for i in range(3)]
    q4 = {"group_size": 64, "bits": 4}
    cfg["quantization"] = {"group_size": 32, "bits": 8}
    cfg["quantization"].update({f"{b}.{n}": q4 for b in banks for n in PROJS})
    (p / "config.json").write_text(json.dumps(cfg))
    assert open_store(p).quantization == {**q4, "mode": "affine"}
    del cfg["quantization"][f"{banks[2]}.down_proj"]
    (p / "config.json").write_text(json.dumps(cfg))  # found from the shapes, as mlx-lm does
    assert open_store(p).quantization == {**q4, "mode": "affine"}
