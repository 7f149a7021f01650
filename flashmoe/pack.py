"""``flashmoe pack``: write a packed expert store from a checkpoint.

A packed store is a directory::

    config.json, tokenizer files       copied from the source
    model.safetensors                  the dense (non-expert) tensors, original names and bytes
    experts/layer-LLL.bin              one record per expert at expert * record_stride
    manifest.json                      layout, quantization, files, crc32 per record (written last)

It is written into ``OUT.partial`` and renamed to ``OUT`` only once the manifest is in place, so an
interrupted run never leaves something ``open_store`` takes for a good store.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from flashmoe.errors import CheckpointError
from flashmoe.outdir import output_dir
from flashmoe.store import (
    FP8_BLOCK,
    PACKED_FORMAT,
    PACKED_VERSION,
    RECORD_ALIGN,
    ST_NAMES,
    RecordLayout,
    Store,
    _roundup,
    layout_to_json,
    make_layout,
    open_store,
    record_to_arrays,
)

COPY_GLOBS = (
    "config.json",
    "generation_config.json",
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template*",
    "*.jinja",
    "vocab.json",
    "merges.txt",
    "preprocessor_config.json",
)
DENSE_FILE = "model.safetensors"
_COPY_CHUNK = 16 << 20

Convert = Callable[[memoryview, memoryview], None]


def _copy_side_files(src: Path, dst: Path) -> None:
    for pattern in COPY_GLOBS:
        for f in sorted(src.glob(pattern)):
            if f.is_file():
                shutil.copy2(f, dst / f.name)


def _write_dense(store: Store, dst: Path) -> list[str]:
    """Stream the dense tensors' bytes, unchanged, into one safetensors file."""
    tensors = store.dense_tensors()
    header: dict[str, Any] = {"__metadata__": {"format": "mlx" if store.kind == "mlx" else "pt"}}
    off = 0
    for name in sorted(tensors):
        t = tensors[name]
        header[name] = {
            "dtype": ST_NAMES.get(t.dtype, t.dtype),
            "shape": list(t.shape),
            "data_offsets": [off, off + t.nbytes],
        }
        off += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as the format recommends
    buf = bytearray(_COPY_CHUNK)
    with open(dst / DENSE_FILE, "wb") as out:
        out.write(len(raw).to_bytes(8, "little"))
        out.write(raw)
        for name in sorted(tensors):
            t = tensors[name]
            fd = os.open(t.path, os.O_RDONLY)
            try:
                done = 0
                while done < t.nbytes:
                    n = min(_COPY_CHUNK, t.nbytes - done)
                    got = os.preadv(fd, [memoryview(buf)[:n]], t.offset + done)
                    if got != n:
                        raise CheckpointError(f"short read of {name} from {t.path}: truncated?")
                    out.write(memoryview(buf)[:n])
                    done += n
            finally:
                os.close(fd)
    return [DENSE_FILE]


def _to_mx(a: np.ndarray, dtype: str) -> Any:
    import mlx.core as mx

    x = mx.array(a)
    return x.view(mx.bfloat16) if dtype == "bfloat16" else x


def _from_mx(x: Any) -> np.ndarray:
    import mlx.core as mx

    return np.array(x.view(mx.uint16) if x.dtype == mx.bfloat16 else x)


def _source_weights(store: Store) -> dict[str, tuple[int, int, str]]:
    """Each projection of the source records: (out_dim, in_dim, float dtype of its values)."""
    src, quant = store.layout, store.quantization
    out = {}
    for t in src.tensors:
        proj, kind = t.name.rsplit(".", 1)
        if kind != "weight":
            continue
        q = (quant or {}).get(proj, quant)
        if t.dtype == "float8_e4m3":
            out[proj] = (t.shape[0], t.shape[1], "bfloat16")  # as mlx-lm dequantizes it
        elif q:
            s = src.tensor(f"{proj}.scales")
            out[proj] = (s.shape[0], s.shape[1] * q["group_size"], s.dtype)
        else:
            out[proj] = (t.shape[0], t.shape[1], t.dtype)
    return out


def _decode(store: Store, arrs: dict[str, np.ndarray], proj: str, fdtype: str) -> Any:
    """One projection's weights as mlx-lm computes with them (dequantized on load for FP8)."""
    import mlx.core as mx

    src, quant = store.layout, store.quantization
    w = _to_mx(arrs[f"{proj}.weight"], src.tensor(f"{proj}.weight").dtype)
    if f"{proj}.weight_scale_inv" in arrs:
        return dequantize_fp8(w, mx.array(arrs[f"{proj}.weight_scale_inv"]))
    q = (quant or {}).get(proj, quant)
    if not q:
        return w
    biases = arrs.get(f"{proj}.biases")
    return mx.dequantize(w, _to_mx(arrs[f"{proj}.scales"], fdtype),
                         None if biases is None else _to_mx(biases, fdtype),
                         group_size=q["group_size"], bits=q["bits"], mode=q.get("mode", "affine"))


def dequantize_fp8(weight: Any, scale_inv: Any) -> Any:
    """e4m3 codes times their 128x128 block scales, in bf16: the operations mlx-lm's sanitize
    applies to FP8 checkpoints, so the result is bit for bit what mlx-lm computes with."""
    import mlx.core as mx

    w = mx.from_fp8(weight, dtype=mx.bfloat16)
    m, n = w.shape
    pm, pn = -m % FP8_BLOCK, -n % FP8_BLOCK
    w = mx.pad(w, ((0, pm), (0, pn))).reshape(
        (m + pm) // FP8_BLOCK, FP8_BLOCK, (n + pn) // FP8_BLOCK, FP8_BLOCK)
    w = (w * scale_inv[:, None, :, None]).reshape(m + pm, n + pn)
    return w[:m, :n].astype(mx.bfloat16)


def requantize_plan(store: Store, bits: int | None,
                    group_size: int) -> tuple[RecordLayout, dict | None, Convert]:
    """The target layout and a function that converts one source record into it: quantized to
    ``bits`` (affine), or, with ``bits`` None, FP8 experts dequantized to bf16 as mlx-lm does."""
    src = store.layout
    projs = _source_weights(store)
    specs = []
    for proj, (out_dim, in_dim, fdtype) in projs.items():
        if fdtype not in ("bfloat16", "float16", "float32"):
            raise CheckpointError(f"{proj}.weight: cannot quantize from dtype {fdtype}")
        if bits is None:
            specs.append((f"{proj}.weight", fdtype, (out_dim, in_dim)))
        elif in_dim % group_size or (in_dim * bits) % 32:
            raise CheckpointError(
                f"{proj}: input size {in_dim} is not a multiple of group size {group_size}"
            )
        else:
            specs += [
                (f"{proj}.weight", "uint32", (out_dim, in_dim * bits // 32)),
                (f"{proj}.scales", fdtype, (out_dim, in_dim // group_size)),
                (f"{proj}.biases", fdtype, (out_dim, in_dim // group_size)),
            ]
        bias = f"{proj}.bias"
        if any(t.name == bias for t in src.tensors):
            b = src.tensor(bias)
            specs.append((bias, b.dtype, b.shape))
    layout = make_layout(specs)
    quant = None if bits is None else {"group_size": group_size, "bits": bits, "mode": "affine"}

    def convert(rec: memoryview, out: memoryview) -> None:
        import mlx.core as mx

        arrs = record_to_arrays(src, rec)
        dst = record_to_arrays(layout, out)
        for proj, (_, _, fdtype) in projs.items():
            w = _decode(store, arrs, proj, fdtype)
            if bits is None:
                dst[f"{proj}.weight"][...] = _from_mx(w)
            else:
                wq, scales, biases = mx.quantize(w, group_size=group_size, bits=bits)
                for name, x in (("weight", wq), ("scales", scales), ("biases", biases)):
                    dst[f"{proj}.{name}"][...] = _from_mx(x)
            if f"{proj}.bias" in dst:
                dst[f"{proj}.bias"][...] = arrs[f"{proj}.bias"]

    return layout, quant, convert


def pack(
    src: str | os.PathLike,
    out: str | os.PathLike,
    bits: int | None = None,
    group_size: int = 64,
    force: bool = False,
    progress: bool = True,
) -> Path:
    """Write a packed store of ``src`` to ``out``; re-quantize experts when ``bits`` is given."""
    store = open_store(src, convert=True)
    out = Path(out).absolute()
    try:
        with output_dir(out, "pack", force=force, sources=[store.path], also=_is_packed) as dst:
            (dst / "experts").mkdir()
            _pack_into(store, dst, bits, group_size, progress)
    finally:
        store.close()
    return out


def _is_packed(path: Path) -> bool:
    """A packed store written before output folders carried a marker."""
    try:
        return json.loads((path / "manifest.json").read_text()).get("format") == PACKED_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _pack_into(store: Store, dst: Path, bits: int | None, group_size: int, progress: bool) -> None:
    _copy_side_files(store.path, dst)
    dense_files = _write_dense(store, dst)
    if bits is None and not store.fp8:
        layout, quant, convert = store.layout, store.quantization, None
    else:
        layout, quant, convert = requantize_plan(store, bits, group_size)
    stride = _roundup(layout.nbytes, RECORD_ALIGN)
    E = store.num_experts
    src_buf = memoryview(bytearray(store.layout.nbytes))
    # two output buffers: one is read (and converted) while the other is written; their gaps
    # and tails are never written, so they stay zero
    bufs = [memoryview(bytearray(stride)) for _ in range(2)]

    def produce(layer: int, e: int, out: memoryview) -> memoryview:
        if convert is None:
            store.read_into(layer, e, out)
        else:
            store.read_into(layer, e, src_buf)
            convert(src_buf, out)
        return out

    jobs = [(layer, e) for layer in store.moe_layers for e in range(E)]
    files = {str(layer): f"experts/layer-{layer:03d}.bin" for layer in store.moe_layers}
    checksums: dict[str, list[int]] = {str(layer): [] for layer in store.moe_layers}
    bar = tqdm(total=len(jobs) * stride, unit="B", unit_scale=True, disable=not progress)
    f = None
    try:
        with bar, ThreadPoolExecutor(1) as pool:
            pending = pool.submit(produce, *jobs[0], bufs[0])
            for i, (layer, e) in enumerate(jobs):
                buf = pending.result()
                if i + 1 < len(jobs):
                    pending = pool.submit(produce, *jobs[i + 1], bufs[(i + 1) % 2])
                if e == 0:
                    f = open(dst / files[str(layer)], "wb")  # noqa: SIM115
                checksums[str(layer)].append(zlib.crc32(buf[: layout.nbytes]))
                f.write(buf)
                if e == E - 1:
                    os.fsync(f.fileno())
                    f.close()
                bar.update(stride)
    finally:
        if f is not None:
            f.close()
    manifest = {
        "format": PACKED_FORMAT,
        "version": PACKED_VERSION,
        "source": {"kind": store.kind, "name": store.path.name},
        "model_type": store.model_type,
        "moe_layers": store.moe_layers,
        "num_experts": E,
        "top_k": store.top_k,
        "quantization": quant,
        "record_stride": stride,
        "layout": layout_to_json(layout),
        "bank_paths": {str(layer): store.bank_path(layer) for layer in store.moe_layers},
        "projections": {str(layer): store.projections(layer) for layer in store.moe_layers},
        "dense_files": dense_files,
        "ignored": store.ignored_parts(),  # left out, as mlx-lm leaves it out; inspect lists it
        "files": files,
        "checksums": checksums,
    }
    tmp = dst / "manifest.json.tmp"
    with open(tmp, "w") as f:
        json.dump(manifest, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, dst / "manifest.json")


def cmd_pack(args: Any) -> int:
    """``flashmoe pack SRC OUT [--bits N] [--group-size G] [--force]``."""
    t0 = time.perf_counter()
    out = pack(args.src, args.out, bits=args.bits, group_size=args.group_size, force=args.force)
    secs = time.perf_counter() - t0
    store = open_store(out)
    written = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(
        f"packed {len(store.moe_layers)} layers x {store.num_experts} experts "
        f"({written / 1e9:.2f} GB) to {out} in {secs:.1f} s ({written / 1e6 / secs:.0f} MB/s)"
    )
    return 0
