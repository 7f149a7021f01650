"""On an MLX GPU backend: streamed greedy tokens equal mlx-lm's, with and without the CUDA copier.

Marked ``gpu`` (deselected by default) and skipped where MLX's default device is not a GPU.
Run with ``pytest -m gpu tests/test_gpu.py``.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm import load as mlx_load
from mlx_lm.generate import generate_step

from flashmoe.orchestrator.cuda_copy import MAX_ARRAY_BYTES, on_cuda
from flashmoe.orchestrator.engine import Engine, GenRequest
from flashmoe.pack import pack
from flashmoe.store import open_store
from flashmoe.synth import synth

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(mx.default_device() != mx.gpu, reason="MLX's default device is not a GPU"),
]

N_TOKENS = 24
PROMPT = [5, 17, 101, 42, 7, 300, 11, 64, 250, 3, 99, 128]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu")
    src = synth(root / "mlx", "qwen3_moe", layout="mlx", bits=4, seed=3)
    return src, pack(src, root / "packed", progress=False)


def reference_ids(path, dtype: mx.Dtype, n: int, eos: set[int]) -> list[int]:
    m, _tok = mlx_load(str(path))
    if dtype != mx.bfloat16:  # dtype "auto" on a GPU keeps the checkpoint's (bf16) dtypes
        m.set_dtype(dtype)
    ids = []
    for token, _ in generate_step(mx.array(PROMPT), m, max_tokens=n):
        if token in eos:
            break
        ids.append(int(token))
    return ids


def streamed_ids(eng: Engine) -> list[int]:
    ids = []
    for c in eng.generate(GenRequest(id="g", prompt=list(PROMPT), max_tokens=N_TOKENS)):
        ids.extend(c.token_ids)
    return ids


def small_budget(path) -> int:
    # about a third of the experts: misses and evictions all along
    return max(open_store(path).expert_bytes_total() // 3, 1)


@pytest.fixture(scope="module")
def runs(model):
    """Streamed greedy tokens with the device copier and with the numpy copy path."""
    _src, packed = model
    out = {}
    for copier in (True, False):
        with Engine(str(packed), memory_budget=small_budget(packed), workers=2) as eng:
            cp = eng.cache.copier
            if not copier and cp is not None:
                cp.close()
                eng.cache.copier = cp = None
            if copier and cp is None:
                continue  # not CUDA, or a dtype that needs converting
            ids = streamed_ids(eng)
            st = eng.cache.stats
            assert st.misses > 0 and st.hits > 0
            if cp is not None:  # every miss went through the copier
                payload = sum(t.nbytes for t in eng.cache.layout.tensors)
                assert cp.nbytes_copied == st.misses * payload
            out["copier" if copier else "numpy"] = ids
            out["dtype"], out["eos"] = eng.compute_dtype, set(eng.tokenizer.eos_token_ids)
    return out


def test_copier_same_tokens_as_numpy_path(runs):
    if "copier" not in runs:
        pytest.skip("no device copier here (not CUDA, or a dtype needs converting)")
    assert runs["copier"] == runs["numpy"]


@pytest.mark.parametrize("path", ["copier", "numpy"])
def test_streamed_equals_mlx_lm(model, runs, path):
    if path not in runs:
        pytest.skip("no device copier here (not CUDA, or a dtype needs converting)")
    src, _packed = model
    assert runs[path] == reference_ids(src, runs["dtype"], N_TOKENS, runs["eos"])


def test_copier_bytes(model):
    """A filled cache slot holds exactly the staging slot's bytes, read back through MLX."""
    _src, packed = model
    with Engine(str(packed), memory_budget=small_budget(packed), workers=1) as eng:
        cp = eng.cache.copier
        if cp is None:
            pytest.skip("no device copier here")
        layout = eng.cache.layout
        rng = np.random.default_rng(0)
        stage = eng.pool.slot(0)
        stage[:] = rng.integers(0, 256, size=stage.size, dtype=np.uint8)
        for slot in (0, eng.cache.nslots - 1, eng.cache.nslots // 2):
            cp.fill(slot, 0)
            for t in layout.tensors:
                a = eng.cache.arrays[t.name][slot]
                raw = a.view(mx.uint16) if a.dtype == mx.bfloat16 else a
                got = np.array(raw).view(np.uint8).reshape(-1)
                assert np.array_equal(got, stage[t.offset:t.offset + t.nbytes]), t.name


def test_cache_arrays_under_2gib(model):
    if not on_cuda():
        pytest.skip("the cap applies on CUDA only")
    _src, packed = model
    with Engine(str(packed), memory_budget="8GiB", workers=1) as eng:
        assert all(a.nbytes <= MAX_ARRAY_BYTES for a in eng.cache.arrays.values())
