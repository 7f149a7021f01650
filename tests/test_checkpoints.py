"""Checkpoints as they are published, against mlx-lm on the same files: greedy tokens at a quarter
of the expert bytes are identical, or the format is refused with a message that says why.

Each row synthesizes a tiny checkpoint (2-4 layers, hidden 64, 8 experts) in one published
layout: MTP and vision tensors, FP8 block-scaled originals, legacy per-expert quantized Mixtral,
the mxfp4 / nvfp4 / mxfp8 modes, mixed bits, Kimi-K2 through mlx-lm's remapping.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import pytest
from support import mlx_lm_ids

from flashmoe.cli import main
from flashmoe.errors import CheckpointError
from flashmoe.orchestrator.budget import budget_for_pool
from flashmoe.orchestrator.engine import Engine, GenRequest
from flashmoe.pack import pack
from flashmoe.store import open_store, read_safetensors_header
from flashmoe.synth import make_config, synth

PROMPT = "The expert pool holds"
N_TOKENS = 24
SIZES = {"layers": 2, "hidden": 128, "experts": 16, "topk": 2, "moe_inter": 64}


def reference_ids(path: Path, n: int = N_TOKENS) -> list[int]:
    return mlx_lm_ids(path, PROMPT, n, mx.float32)


def streamed_ids(path: Path | str, n: int = N_TOKENS) -> list[int]:
    store = open_store(path)
    pool = max(store.expert_bytes_total() * 2 // 4, 1)  # f32 cache of bf16 / 4-bit records
    budget = budget_for_pool(store, pool, mx.float32)
    with Engine(str(path), memory_budget=budget, workers=1, dtype="float32") as eng:
        ids, stats = [], {}
        for c in eng.generate(GenRequest(id="t", max_tokens=n, prompt=PROMPT)):
            ids.extend(c.token_ids)
            stats = c.stats or stats
    assert stats["expert_misses"] > store.num_experts  # experts were evicted and read again
    return ids


def make(root: Path, name: str, arch: str, **kw) -> Path:
    # Qwen3.5 needs a full-attention layer: one in four is
    sizes = {**SIZES, "layers": 4 if arch == "qwen3_5_moe" else 2, **kw.pop("sizes", {})}
    return synth(root / name, arch, seed=3, **sizes, **kw)


def assert_identical(path: Path, reference: Path | None = None) -> None:
    want = reference_ids(reference or path)
    assert len(want) > 0
    assert streamed_ids(path) == want


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ckpts")


def test_qwen3_5_vision_and_mtp_are_ignored(root):
    plain = make(root, "q35", "qwen3_5_moe", layout="hf")
    full = make(root, "q35-vis-mtp", "qwen3_5_moe", layout="hf", mtp=True, vision=True)
    a, b = open_store(plain), open_store(full)
    assert b.dense_bytes() == a.dense_bytes()
    assert b.expert_bytes_total() == a.expert_bytes_total()
    parts = b.ignored_parts()
    assert set(parts) == {"mtp", "model.visual"} and all(v[1] > 0 for v in parts.values())
    assert_identical(full)
    packed = pack(full, root / "q35-vis-mtp-p", progress=False)
    assert open_store(packed).ignored_parts() == parts
    names = read_safetensors_header(packed / "model.safetensors")
    assert not any(k.startswith(("mtp.", "model.visual.")) for k in names)


def test_inspect_lists_ignored_parts(root, capsys):
    path = make(root, "q35-i", "qwen3_5_moe", layout="hf", mtp=True, vision=True)
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("ignored:"))
    assert "mtp (" in line and "model.visual (" in line and "KiB" in line


def deepseek_published_shape(root: Path) -> Path:
    # DeepSeek-V3's published shape: 61 decoder layers, the first 3 dense, layer 61 the MTP
    # module (with its own experts), which mlx-lm's sanitize drops by that number
    sizes = {"layers": 61, "experts": 4}
    cfg = make_config("deepseek_v3", **{**SIZES, **sizes})
    cfg["first_k_dense_replace"] = 3
    path = root / "ds-mtp"
    if not path.exists():
        make(root, "ds-mtp", "deepseek_v3", layout="hf", mtp=True, config=cfg, sizes=sizes)
    return path


def test_deepseek_mtp_layer_and_first_dense_layers(root):
    store = open_store(deepseek_published_shape(root))
    assert store.moe_layers == list(range(3, 61))
    assert list(store.ignored_parts()) == ["layer 61 (multi-token prediction)"]
    assert store.dense_bytes() == sum(t.nbytes for t in store.dense_tensors().values())
    assert not any(k.startswith("model.layers.61.") for k in store.dense_tensors())


@pytest.mark.slow
def test_deepseek_published_shape_streams_identically(root):
    assert_identical(deepseek_published_shape(root))


def test_fp8_block_scaled_is_converted_by_pack(root, capsys):
    src = make(root, "ds-fp8", "deepseek_v3", layout="hf", fp8=True)
    with pytest.raises(CheckpointError, match="FP8 block-scaled .*flashmoe pack"):
        open_store(src)
    assert main(["inspect", str(src)]) == 0
    assert "float8_e4m3" in capsys.readouterr().out
    packed = pack(src, root / "ds-fp8-p", progress=False)
    assert {t.dtype for t in open_store(packed).layout.tensors} == {"bfloat16"}
    assert_identical(packed, reference=src)
    q8 = pack(src, root / "ds-fp8-q8", bits=8, progress=False)
    assert open_store(q8).quantization["bits"] == 8
    assert len(streamed_ids(q8)) > 0


def test_legacy_per_expert_quantized_mixtral(root):
    path = make(root, "mix-legacy", "mixtral", layout="mlx", legacy=True)
    store = open_store(path)
    assert store.kind == "hf" and store.quantization["bits"] == 4
    assert_identical(path)


@pytest.mark.parametrize("mode", ["mxfp4", "nvfp4", "mxfp8"])
def test_quantization_modes(root, mode):
    path = make(root, f"q3-{mode}", "qwen3_moe", layout="mlx", mode=mode)
    assert open_store(path).quantization["mode"] == mode
    assert_identical(path)


def test_mixed_bits_per_projection(root):
    path = make(root, "q3-mixed-proj", "qwen3_moe", layout="mlx", bits=4)
    cfg = json.loads((path / "config.json").read_text())
    assert open_store(path).quantization["bits"] == 4
    # the same checkpoint, its down projections re-quantized to 8 bits, recorded per module
    requant = root / "q3-mixed-proj-8"
    shutil.copytree(path, requant)
    for shard in sorted(requant.glob("model*.safetensors")):
        ws = mx.load(str(shard))
        for k in [k for k in ws if k.endswith("switch_mlp.down_proj.weight")]:
            base = k[: -len(".weight")]
            w = mx.dequantize(ws[k], ws[base + ".scales"], ws[base + ".biases"], 64, 4)
            ws[k], ws[base + ".scales"], ws[base + ".biases"] = mx.quantize(w, 64, 8)
            cfg["quantization"][base] = {"group_size": 64, "bits": 8}
        mx.save_safetensors(str(shard), ws, metadata={"format": "mlx"})
    (requant / "config.json").write_text(json.dumps(cfg))
    q = open_store(requant).quantization
    assert q["down_proj"]["bits"] == 8 and q["gate_proj"]["bits"] == 4
    assert_identical(requant)


@pytest.mark.parametrize("recipe", ["mixed_4_6", "mixed_2_6"])
def test_mixed_bits_per_layer(root, recipe):
    # mlx-lm's recipes give some layers' down projections 6 bits: the store's record holds both
    # ways (down_proj and down_proj~1) and each layer computes with its own
    path = make(root, f"q3-{recipe}", "qwen3_moe", layout="mlx", recipe=recipe)
    store = open_store(path)
    assert [store.projections(layer)["down_proj"] for layer in store.moe_layers] == [
        "down_proj", "down_proj~1"]
    assert store.quantization["down_proj~1"]["bits"] == 6
    assert_identical(path)
    packed = pack(path, root / f"q3-{recipe}-p", progress=False)
    assert open_store(packed).projections(1) == store.projections(1)
    assert streamed_ids(packed) == reference_ids(path)


def test_kimi_k2_through_mlx_lm_remapping(root):
    # Kimi-K2 runs on mlx-lm's deepseek_v3 code; the same files under its own model_type give
    # the same store (its published tokenizer needs the repository's remote code, so the tokens
    # are compared on the deepseek_v3 twin)
    ds = make(root, "kimi-twin", "deepseek_v3", layout="mlx")
    kimi = root / "kimi"
    shutil.copytree(ds, kimi)
    cfg = json.loads((kimi / "config.json").read_text())
    (kimi / "config.json").write_text(json.dumps({**cfg, "model_type": "kimi_k2"}))
    a, b = open_store(ds), open_store(kimi)
    assert b.model_type == "kimi_k2"
    assert (b.moe_layers, b.layout, b.quantization) == (a.moe_layers, a.layout, a.quantization)
    assert [b.extents(1, e) for e in range(4)] == [
        [x.__class__(x.path.replace("kimi-twin", "kimi"), x.offset, x.length, x.dest)
         for x in a.extents(1, e)] for e in range(4)]
    assert_identical(ds)


def test_nvfp4_global_scale_refused(root):
    path = make(root, "q3-nvfp4-gs", "qwen3_moe", layout="mlx", mode="nvfp4")
    for shard in sorted(path.glob("model*.safetensors")):
        ws = mx.load(str(shard))
        for k in [k for k in ws if k.endswith("switch_mlp.up_proj.weight")]:
            ws[k[: -len("weight")] + "global_scale"] = mx.ones((SIZES["experts"],))
        mx.save_safetensors(str(shard), ws, metadata={"format": "mlx"})
    with pytest.raises(CheckpointError, match="nvfp4 with a per-expert global_scale"):
        open_store(path)


def test_hugging_face_repo_id_from_the_cache(root, tmp_path, monkeypatch):
    src = make(root, "hub-src", "qwen3_moe", layout="mlx")
    repo = tmp_path / "hub" / "models--tiny-org--tiny-moe"
    rev = "0123456789abcdef0123456789abcdef01234567"
    snap = repo / "snapshots" / rev
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for f in sorted(src.iterdir()):  # blobs by content, snapshot files link to them
        blob = repo / "blobs" / f"blob-{f.name}"
        shutil.copy(f, blob)
        (snap / f.name).symlink_to(Path("..", "..", "blobs", blob.name))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(rev)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    store = open_store("tiny-org/tiny-moe")
    assert store.path == snap
    assert streamed_ids("tiny-org/tiny-moe") == reference_ids(src)
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    assert open_store("tiny-org/tiny-moe").path == snap
    with pytest.raises(CheckpointError, match="neither a directory nor a Hugging Face repo"):
        open_store("tiny-org/absent-model")


@pytest.mark.slow
def test_every_architecture_streams_identically_or_is_refused(tmp_path):
    """The closing table (scripts/checkpoint_matrix.py): no row may differ from mlx-lm or fail
    without a message; rows are identical, refused, or not synthesizable at tiny sizes."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    from checkpoint_matrix import VARIANTS, moe_architectures, row

    archs = moe_architectures()
    assert {"qwen3_moe", "deepseek_v3", "gpt_oss", "glm4_moe", "minimax"} <= set(archs)
    bad = []
    for arch in archs:
        for layout, label, opts in VARIANTS:
            result = row(arch, layout, opts, tmp_path)
            if result.startswith(("DIFFERS", "FAILED")):
                bad.append(f"{arch} {layout} {label}: {result}")
    assert not bad, bad


def test_forward_passes_that_evaluate_are_found():
    # dbrx's MoE block reads its routing on the host inside the forward pass: an architecture
    # built like that is refused (deferred GPU banks rely on nothing being evaluated midway)
    import mlx_lm.models.dbrx as dbrx

    from flashmoe.banks import evaluates_midway, model_tree

    args = dbrx.ModelArgs(model_type="dbrx", d_model=64, n_heads=2, n_layers=2, vocab_size=100,
                          ffn_config={"ffn_hidden_size": 64, "moe_num_experts": 4,
                                      "moe_top_k": 2},
                          attn_config={"kv_n_heads": 1, "clip_qkv": 8, "rope_theta": 1e4})
    assert evaluates_midway(dbrx.SparseMoeBlock(args)) == "SparseMoeBlock.__call__ calls np.array"
    cfg = make_config("qwen3_moe", **SIZES)
    assert evaluates_midway(synth_model(cfg)) is None
    assert model_tree(cfg).top_k == SIZES["topk"]


def synth_model(config: dict):
    from mlx_lm.utils import _get_classes

    model_class, args_class = _get_classes(config=config)
    return model_class(args_class.from_dict(config))


@pytest.mark.parametrize("arch", ["qwen3_next", "qwen2_moe", "olmoe", "glm4_moe", "minimax"])
def test_hugging_face_families(root, arch):
    # published per-expert names, as each family's sanitize in mlx-lm stacks them; config
    # filled from mlx-lm's ModelArgs (qwen3_next needs a full-attention layer: 4 layers)
    sizes = {"layers": 4} if arch == "qwen3_next" else {}
    path = make(root, f"{arch}-hf", arch, layout="hf", sizes=sizes)
    assert open_store(path).kind == "hf"
    assert_identical(path)


def test_gpt_oss_mlx_streams_and_its_original_is_refused(root):
    assert_identical(make(root, "gpt-oss-mlx", "gpt_oss", layout="mlx", mode="mxfp4"))
    original = make(root, "gpt-oss-hf", "gpt_oss", layout="hf")
    assert len(reference_ids(original)) > 0  # mlx-lm reads it
    with pytest.raises(CheckpointError, match="interleaves gate and up rows"):
        open_store(original)


def test_minimax_fp8_original_packs_exactly(root):
    src = make(root, "minimax-fp8", "minimax", layout="hf", fp8=True)
    packed = pack(src, root / "minimax-fp8-p", progress=False)
    assert_identical(packed, reference=src)
