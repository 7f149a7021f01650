"""flashmoe synth: tiny random checkpoints that mlx-lm loads, in the layouts published for real."""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
import numpy as np
import pytest
from mlx_lm.generate import generate_step

import flashmoe.synth as synth_mod
from flashmoe.cli import main
from flashmoe.errors import CheckpointError, FlashMoeError
from flashmoe.outdir import MARKER
from flashmoe.synth import ARCHS, synth

CASES = [(a, "hf", 4) for a in ARCHS] + [(a, "mlx", 4) for a in ARCHS] + [("qwen3_moe", "mlx", 8)]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Checkpoints by (arch, layout, bits), each written once per module."""
    root = tmp_path_factory.mktemp("synth")
    cache: dict[tuple, Path] = {}

    def get(arch: str, layout: str, bits: int = 4) -> Path:
        key = (arch, layout, bits)
        if key not in cache:
            cache[key] = synth(root / f"{arch}-{layout}{bits}", arch, layout, bits=bits)
        return cache[key]

    return get


def _headers(path: Path) -> dict[str, tuple[dict, int, int]]:
    """file name -> (safetensors header, header length, file size)."""
    out = {}
    for f in sorted(path.glob("model*.safetensors")):
        with open(f, "rb") as fh:
            n = struct.unpack("<Q", fh.read(8))[0]
            out[f.name] = (json.loads(fh.read(n)), n, f.stat().st_size)
    return out


def _tensors(path: Path) -> dict[str, tuple[str, tuple]]:
    out = {}
    for header, _, _ in _headers(path).values():
        header.pop("__metadata__", None)
        out.update({k: (v["dtype"], tuple(v["shape"])) for k, v in header.items()})
    return out


def _digest(path: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(path.iterdir())}


def _load(path: Path):
    model, tok = mlx_lm.load(str(path))
    model.set_dtype(mx.float32)  # gather_mm on the Linux CPU backend wants float32
    return model, tok


@pytest.mark.parametrize("arch,layout,bits", CASES)
def test_mlx_lm_loads_and_generates(built, arch, layout, bits):
    model, tok = _load(built(arch, layout, bits))
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True
    )
    steps = zip(generate_step(mx.array(prompt), model), range(5), strict=False)
    ids = [int(token) for (token, _), _ in steps]
    assert len(ids) == 5 and all(0 <= t < tok.vocab_size for t in ids)
    text = mlx_lm.generate(model, tok, prompt="hello world", max_tokens=4)
    assert isinstance(text, str)


@pytest.mark.parametrize("arch,layout,bits", CASES)
def test_index_matches_shards(built, arch, layout, bits):
    path = built(arch, layout, bits)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    headers = _headers(path)
    total = 0
    mapped = {}
    for name, (header, hlen, size) in headers.items():
        meta = header.pop("__metadata__")
        assert meta["format"] == ("pt" if layout == "hf" else "mlx")
        assert hlen % 8 == 0
        spans = sorted(v["data_offsets"] for v in header.values())
        assert spans[0][0] == 0 and all(
            a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False)
        )
        assert 8 + hlen + spans[-1][1] == size
        for k, v in header.items():
            item = {"BF16": 2, "F32": 4, "U32": 4}[v["dtype"]]
            assert v["data_offsets"][1] - v["data_offsets"][0] == item * int(np.prod(v["shape"]))
            assert v["data_offsets"][0] % item == 0
            mapped[k] = name
        total += spans[-1][1]
    assert index["weight_map"] == mapped
    assert index["metadata"]["total_size"] == total
    n = len(headers)
    assert sorted(headers) == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]


@pytest.mark.parametrize("arch", ARCHS)
def test_mlx_layout_is_what_convert_writes(built, tmp_path, arch):
    dst = tmp_path / "converted"
    mlx_lm.convert(str(built(arch, "hf")), str(dst), quantize=True, q_bits=4, q_group_size=64)
    mine = built(arch, "mlx")
    assert _tensors(dst) == _tensors(mine)
    assert json.loads((dst / "config.json").read_text()) == json.loads(
        (mine / "config.json").read_text()
    )
    meta = json.loads((dst / "model.safetensors.index.json").read_text())["metadata"]
    assert json.loads((mine / "model.safetensors.index.json").read_text())["metadata"] == meta


def test_published_names(built):
    q3 = _tensors(built("qwen3_moe", "hf"))
    assert q3["model.layers.0.mlp.experts.15.down_proj.weight"] == ("BF16", (128, 64))
    q35 = _tensors(built("qwen3_5_moe", "hf"))
    gate_up = q35["model.language_model.layers.0.mlp.experts.gate_up_proj"]
    assert gate_up == ("BF16", (16, 128, 128))
    assert q35["model.language_model.layers.0.mlp.experts.down_proj"] == ("BF16", (16, 128, 64))
    assert q35["model.language_model.layers.0.linear_attn.conv1d.weight"][1][1:] == (1, 4)
    assert q35["model.language_model.layers.0.linear_attn.A_log"][0] == "F32"
    ds = _tensors(built("deepseek_v3", "hf"))
    assert "model.layers.0.mlp.gate_proj.weight" in ds  # first_k_dense_replace
    assert "model.layers.1.self_attn.kv_b_proj.weight" in ds
    assert ds["model.layers.1.mlp.gate.e_score_correction_bias"] == ("F32", (16,))
    assert "model.layers.1.mlp.shared_experts.up_proj.weight" in ds
    mx_ = _tensors(built("mixtral", "hf"))
    assert mx_["model.layers.3.block_sparse_moe.experts.7.w2.weight"] == ("BF16", (128, 64))
    q3m = _tensors(built("qwen3_moe", "mlx"))
    assert q3m["model.layers.0.mlp.switch_mlp.up_proj.weight"] == ("U32", (16, 64, 16))
    assert q3m["model.layers.0.mlp.switch_mlp.up_proj.scales"] == ("BF16", (16, 64, 2))
    assert q3m["model.layers.0.mlp.gate.weight"] == ("U32", (16, 32))  # router at 8 bits
    cfg = json.loads((built("qwen3_moe", "mlx") / "config.json").read_text())
    assert cfg["quantization"]["model.layers.0.mlp.gate"] == {"group_size": 64, "bits": 8}
    assert cfg["quantization_config"] == cfg["quantization"]


def test_weights_are_sane(built):
    model, _ = _load(built("qwen3_5_moe", "hf"))
    lm = model.language_model.model
    assert mx.all(lm.norm.weight == 1).item()  # zero-centered in the file, +1 at sanitize
    w = np.array(lm.layers[0].mlp.switch_mlp.down_proj.weight)
    assert abs(w.std() * np.sqrt(w.shape[-1]) - 1) < 0.1 and abs(w.mean()) < 0.01
    model, _ = _load(built("qwen3_moe", "mlx"))
    sw = model.model.layers[1].mlp.switch_mlp.gate_proj
    w = np.array(mx.dequantize(sw.weight, sw.scales, sw.biases, sw.group_size, sw.bits))
    assert abs(w.std() * np.sqrt(w.shape[-1]) - 1) < 0.1 and abs(w.mean()) < 0.01


class _Tap(nn.Module):
    """Records the router logits of an MoE block, then runs it."""

    def __init__(self, inner, log: list):
        super().__init__()
        self.inner = inner
        self._log = log

    def __call__(self, x):
        gate = self.inner.gate
        logits = gate(x) if isinstance(gate, nn.Module) and hasattr(gate, "scales") else None
        if logits is None:
            logits = x @ gate.weight.T
        self._log.append(np.array(logits.astype(mx.float32)).reshape(-1, logits.shape[-1]))
        return self.inner(x)


@pytest.mark.parametrize("arch,layout", [("qwen3_moe", "mlx"), ("deepseek_v3", "hf")])
def test_routing_is_decisive_and_spread(built, arch, layout):
    model, tok = _load(built(arch, layout))
    log: list = []
    for layer in model.layers:
        for attr in ("mlp", "block_sparse_moe"):
            block = getattr(layer, attr, None)
            if block is not None and hasattr(block, "gate"):
                setattr(layer, attr, _Tap(block, log))
    ids = tok.encode("The quick brown fox jumps over the lazy dog, then writes a number.")
    mx.eval(model(mx.array([ids])))
    assert log
    for logits in log:
        p = np.exp(logits - logits.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        n_experts = p.shape[-1]
        assert p.max(-1).mean() > 5 / n_experts  # uniform would be 1 / n_experts
        assert len(np.unique(p.argmax(-1))) >= n_experts // 2
        top2 = np.sort(logits, -1)[:, -2:]
        assert np.median(top2[:, 1] - top2[:, 0]) > 0.05  # top-1 robust to float noise


def test_same_seed_same_bytes(tmp_path):
    for layout in ("hf", "mlx"):
        a = synth(tmp_path / f"a-{layout}", "qwen3_5_moe", layout, seed=3, shard_size=200_000)
        b = synth(tmp_path / f"b-{layout}", "qwen3_5_moe", layout, seed=3, shard_size=200_000)
        c = synth(tmp_path / f"c-{layout}", "qwen3_5_moe", layout, seed=4, shard_size=200_000)
        assert len(list(a.glob("model-*.safetensors"))) > 1
        assert _digest(a) == _digest(b)
        assert _digest(a) != _digest(c)


def test_tokenizer(built):
    from transformers import AutoTokenizer

    path = built("mixtral", "hf")
    tok = AutoTokenizer.from_pretrained(str(path))
    assert len(tok) == 512
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 511
    text = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(tok.encode("héllo wörld ✓")) == "héllo wörld ✓"
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["eos_token_id"] == tok.eos_token_id and cfg["vocab_size"] == 512


def test_big_model_plan_stays_lazy():
    config = synth_mod._qwen3_moe_config(
        synth_mod.Dims(48, 2048, 128, 8, 768, 151936), {"<|endoftext|>": 0, "<|im_end|>": 1}
    )
    mx.reset_peak_memory()
    tensors, _, _ = synth_mod._plan_mlx(config, 4, 64)
    assert sum(t.nbytes for t in tensors) > 15e9
    assert mx.get_peak_memory() < 64 << 20  # nothing of the 17 GB was evaluated


def test_errors(tmp_path):
    with pytest.raises(CheckpointError, match="llama: mlx-lm's model has no routed experts"):
        synth(tmp_path / "x", "llama", layout="mlx")
    with pytest.raises(FlashMoeError, match="mlx-lm has no model 'no_such_arch'"):
        synth(tmp_path / "x", "no_such_arch")
    out = synth(tmp_path / "m", "mixtral")
    with pytest.raises(FlashMoeError, match="exists"):
        synth(out, "mixtral")
    synth(out, "mixtral", layout="mlx", force=True)
    assert "quantization" in json.loads((out / "config.json").read_text())
    with pytest.raises(FlashMoeError, match="vocab"):
        synth(tmp_path / "v", "mixtral", vocab=100)


def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
    calls = []
    real = synth_mod._write_tensor

    def flaky(*args):
        calls.append(1)
        if len(calls) > 5:
            raise KeyboardInterrupt
        real(*args)

    monkeypatch.setattr(synth_mod, "_write_tensor", flaky)
    with pytest.raises(KeyboardInterrupt):
        synth(tmp_path / "m", "qwen3_moe")
    assert list(tmp_path.iterdir()) == []
    # a stale OUT.partial from a killed run is replaced, never mistaken for the result
    monkeypatch.setattr(synth_mod, "_write_tensor", real)
    (tmp_path / "m.partial").mkdir()
    (tmp_path / "m.partial" / MARKER).write_text("{}")  # what a killed synth writes first
    assert synth(tmp_path / "m", "qwen3_moe").is_dir()
    assert not (tmp_path / "m.partial").exists()


def test_cli(tmp_path, capsys):
    out = tmp_path / "cli"
    argv = ["synth", str(out), "--arch", "deepseek_v3", "--layout", "mlx", "--bits", "8"]
    assert main(argv + ["--shard-size", "100KiB", "--layers", "3"]) == 0
    assert len(list(out.glob("model-*.safetensors"))) > 1
    assert main(argv) == 2
    assert "exists" in capsys.readouterr().err
    assert main(["synth", str(tmp_path / "y"), "--arch", "nope"]) == 2
    assert main(["synth", str(tmp_path / "z"), "--arch", "mixtral", "--shard-size", "lots"]) == 2
    shutil.rmtree(out)
