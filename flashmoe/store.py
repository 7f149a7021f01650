"""The expert store index: where each routed expert's bytes live on disk, and a record's layout.

One module opens all three kinds of store:

- ``hf``: an original Hugging Face checkpoint (per-expert or fused expert tensors, usually bf16);
- ``mlx``: an mlx-community quantized checkpoint (stacked ``switch_mlp`` weight/scales/biases);
- ``packed``: a store written by ``flashmoe pack`` (one aligned record per expert, with checksums).

A *record* is one expert's tensors, named relative to mlx-lm's expert bank after ``sanitize``
(``gate_proj.weight``, ``gate_proj.scales``, ``up_proj.weight``, ``down_proj.biases``,
``fc1.weight``, ...). Every MoE layer of a model has the same record layout. ``extents(layer,
expert)`` says which file ranges fill which byte ranges of the record.

Packed stores hold one extent per record at a ``RECORD_ALIGN``-aligned file offset; the file is
zero-padded to ``record_stride`` after each record, so a reader may round the extent's length up
to its direct-I/O block size.
"""

from __future__ import annotations

import json
import os
import re
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from flashmoe.errors import CheckpointError, ChecksumError

RECORD_ALIGN = 16384  # slot and packed-record alignment (Apple Silicon's page)
TENSOR_ALIGN = 4096  # tensor offsets inside a record
PACKED_FORMAT = "flashmoe-packed"
PACKED_VERSION = 1


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of a record: bank-relative name, dtype name (mlx spelling), shape, byte range."""

    name: str
    dtype: str  # "bfloat16" | "float16" | "float32" | "uint32" | "uint8" ...
    shape: tuple[int, ...]
    offset: int  # byte offset inside the record
    nbytes: int


@dataclass(frozen=True)
class Extent:
    """Copy ``length`` bytes at ``offset`` of ``path`` to byte ``dest`` of the record."""

    path: str
    offset: int
    length: int
    dest: int


@dataclass(frozen=True)
class RecordLayout:
    tensors: tuple[TensorSpec, ...]
    nbytes: int  # record size: end of the last tensor (not rounded to RECORD_ALIGN)

    def tensor(self, name: str) -> TensorSpec:
        for t in self.tensors:
            if t.name == name:
                return t
        raise KeyError(name)


# --- dtypes and layouts -------------------------------------------------------------------------

_ST_DTYPES = {
    "BF16": "bfloat16",
    "F16": "float16",
    "F32": "float32",
    "F64": "float64",
    "U32": "uint32",
    "I32": "int32",
    "U8": "uint8",
    "I8": "int8",
    "U16": "uint16",
    "I16": "int16",
    "I64": "int64",
    "BOOL": "bool",
}
ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}
# numpy views of record tensors; bf16 has no numpy dtype so it is read as its uint16 bit pattern
NP_DTYPES = {
    "bfloat16": np.uint16,
    "float16": np.float16,
    "float32": np.float32,
    "float64": np.float64,
    "uint32": np.uint32,
    "int32": np.int32,
    "uint8": np.uint8,
    "int8": np.int8,
    "uint16": np.uint16,
    "int16": np.int16,
    "int64": np.int64,
    "bool": np.bool_,
}
ITEMSIZE = {k: np.dtype(v).itemsize for k, v in NP_DTYPES.items()}

PROJ_ORDER = ("gate_proj", "up_proj", "down_proj", "fc1", "fc2")
KIND_ORDER = ("weight", "scales", "biases", "bias")


def _roundup(n: int, a: int) -> int:
    return (n + a - 1) // a * a


def _tensor_sort_key(name: str) -> tuple[int, int]:
    proj, kind = name.rsplit(".", 1)
    return PROJ_ORDER.index(proj), KIND_ORDER.index(kind)


def make_layout(specs: list[tuple[str, str, tuple[int, ...]]]) -> RecordLayout:
    """Lay out ``(name, dtype, shape)`` tensors in bank order, each at a 4096-aligned offset."""
    tensors = []
    off = 0
    for name, dtype, shape in sorted(specs, key=lambda s: _tensor_sort_key(s[0])):
        off = _roundup(off, TENSOR_ALIGN)
        nbytes = int(np.prod(shape, dtype=np.int64)) * ITEMSIZE[dtype]
        tensors.append(TensorSpec(name, dtype, tuple(int(x) for x in shape), off, nbytes))
        off += nbytes
    return RecordLayout(tuple(tensors), off)


def layout_to_json(layout: RecordLayout) -> dict:
    return {
        "nbytes": layout.nbytes,
        "tensors": [
            {"name": t.name, "dtype": t.dtype, "shape": list(t.shape), "offset": t.offset,
             "nbytes": t.nbytes}
            for t in layout.tensors
        ],
    }  # fmt: skip


def layout_from_json(d: dict) -> RecordLayout:
    tensors = tuple(
        TensorSpec(t["name"], t["dtype"], tuple(t["shape"]), t["offset"], t["nbytes"])
        for t in d["tensors"]
    )
    return RecordLayout(tensors, d["nbytes"])


# --- safetensors headers ------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorInfo:
    """Where one checkpoint tensor's bytes are: absolute file offset and size."""

    path: str
    offset: int
    nbytes: int
    dtype: str  # mlx spelling, or the safetensors code if mlx has no such dtype
    shape: tuple[int, ...]


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Parse a safetensors header (8-byte little-endian length + JSON); check the file's size."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise ValueError("header length past end of file")
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise CheckpointError(f"missing shard {path}") from None
    except (struct.error, ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not a safetensors file ({e})") from None
    base = 8 + n
    out = {}
    end = base
    for name, h in header.items():
        if name == "__metadata__":
            continue
        begin, stop = h["data_offsets"]
        out[name] = TensorInfo(
            str(path), base + begin, stop - begin, _ST_DTYPES.get(h["dtype"], h["dtype"]),
            tuple(h["shape"]),
        )  # fmt: skip
        end = max(end, base + stop)
    if size < end:
        raise CheckpointError(f"{path} is truncated: {size} bytes, its header needs {end}")
    return out


def _shard_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"{index}: bad index ({e})") from None
        return [path / f for f in sorted(set(weight_map.values()))]
    if (path / "model.safetensors").exists():
        return [path / "model.safetensors"]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no safetensors weights in {path}")
    return files


def read_tensor_index(path: Path) -> dict[str, TensorInfo]:
    """All tensors of a checkpoint directory, from its shard headers."""
    tensors: dict[str, TensorInfo] = {}
    for f in _shard_files(path):
        tensors.update(read_safetensors_header(f))
    return tensors


# --- architectures ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Arch:
    experts_key: str
    inter_key: str
    text_config: bool = False  # settings live under config["text_config"] when it exists


# An architecture added here needs an exactness test, and its mlx-lm forward pass must evaluate
# nothing between two MoE layers (GPU banks hand on their output before their loads land:
# orchestrator/streamed.py, the "deferred" path; tests/test_engine.py checks every entry on it).
ARCHS = {
    "qwen3_moe": _Arch("num_experts", "moe_intermediate_size"),
    "qwen3_5_moe": _Arch("num_experts", "moe_intermediate_size", text_config=True),
    "deepseek_v3": _Arch("n_routed_experts", "moe_intermediate_size"),
    "mixtral": _Arch("num_local_experts", "intermediate_size"),
}


def _text_config(config: dict) -> dict:
    if ARCHS[config["model_type"]].text_config:
        return config.get("text_config", config)
    return config


def _expected_moe_layers(model_type: str, tc: dict) -> list[int]:
    n = tc["num_hidden_layers"]
    if model_type == "qwen3_moe":
        step = tc.get("decoder_sparse_step", 1)
        skip = set(tc.get("mlp_only_layers", []))
        return [i for i in range(n) if i not in skip and (i + 1) % step == 0]
    if model_type == "deepseek_v3":
        k, freq = tc.get("first_k_dense_replace", 0), tc.get("moe_layer_freq", 1)
        return [i for i in range(n) if i >= k and i % freq == 0]
    return list(range(n))


_PREFIX = (
    r"(?P<prefix>model\.|model\.language_model\.|language_model\.model\.)layers\.(?P<layer>\d+)"
)
_BLOCK = r"\.(?P<block>mlp|block_sparse_moe)"
_RE_MLX = re.compile(
    _PREFIX + _BLOCK + r"\.switch_mlp\.(?P<proj>gate_proj|up_proj|down_proj|fc1|fc2)"
    r"\.(?P<kind>weight|scales|biases|bias)$"
)
_RE_HF = re.compile(
    _PREFIX + _BLOCK + r"\.experts\.(?P<expert>\d+)\.(?P<proj>gate_proj|up_proj|down_proj|w1|w2|w3)"
    r"\.(?P<kind>weight|bias|weight_scale_inv)$"
)
_RE_FUSED = re.compile(_PREFIX + _BLOCK + r"\.experts\.(?P<proj>gate_up_proj|down_proj)$")
_HF_PROJ = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}


def _bank_path(prefix: str, layer: int, block: str) -> str:
    # the post-sanitize module path of the expert bank (what mlx-lm's model tree uses)
    if prefix == "model.language_model.":
        prefix = "language_model.model."
    return f"{prefix}layers.{layer}.{block}.switch_mlp"


# --- the store ----------------------------------------------------------------------------------


class Store:
    """An index of one model's routed experts: ``(layer, expert)`` -> extents + record layout."""

    kind: str
    path: Path
    config: dict
    model_type: str
    moe_layers: list[int]
    num_experts: int
    top_k: int
    layout: RecordLayout
    quantization: dict | None
    dense_dir: Path
    record_stride: int  # packed: bytes between records in a layer file; else roundup(nbytes)

    def __init__(self, path: Path, config: dict) -> None:
        self.path = path
        self.config = config
        self.model_type = config.get("model_type", "")
        if self.model_type not in ARCHS:
            raise CheckpointError(
                f"unsupported model_type {self.model_type!r} in {path / 'config.json'} "
                f"(supported: {', '.join(sorted(ARCHS))})"
            )
        tc = _text_config(config)
        arch = ARCHS[self.model_type]
        try:
            self.num_experts = int(tc[arch.experts_key])
            self.top_k = int(tc["num_experts_per_tok"])
            self._hidden = int(tc["hidden_size"])
            self._inter = int(tc[arch.inter_key])
            self.num_layers = int(tc["num_hidden_layers"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path / 'config.json'}: missing or bad setting {e}") from None
        self._checksums: dict[int, list[int]] | None = None
        self._bank_paths: dict[int, str] = {}
        self._dense_tensors: dict[str, TensorInfo] = {}
        self._files: list[str] = []
        self._file_idx: dict[int, np.ndarray] = {}  # layer -> [tensors, experts] index in _files
        self._file_off: dict[int, np.ndarray] = {}  # layer -> [tensors, experts] file offsets
        self._fds: dict[str, int] = {}

    # -- public API --

    def bank_path(self, layer: int) -> str:
        """mlx-lm module path of ``layer``'s expert bank, e.g. ``model.layers.3.mlp.switch_mlp``."""
        self._check(layer, 0)
        return self._bank_paths[layer]

    def extents(self, layer: int, expert: int) -> list[Extent]:
        """File ranges that make up the record of ``expert`` in ``layer`` (absolute paths)."""
        self._check(layer, expert)
        fi = self._file_idx[layer][:, expert]
        fo = self._file_off[layer][:, expert]
        if self.kind == "packed":
            return [Extent(self._files[fi[0]], int(fo[0]), self.layout.nbytes, 0)]
        return [
            Extent(self._files[fi[t]], int(fo[t]), spec.nbytes, spec.offset)
            for t, spec in enumerate(self.layout.tensors)
        ]

    def checksum(self, layer: int, expert: int) -> int | None:
        """zlib.crc32 of the record bytes, or None when the store has no checksums."""
        self._check(layer, expert)
        return None if self._checksums is None else self._checksums[layer][expert]

    def read_record(self, layer: int, expert: int) -> bytes:
        """The record's bytes by plain reads of its extents; the checksum is verified if known."""
        buf = bytearray(self.layout.nbytes)
        self.read_into(layer, expert, memoryview(buf))
        return bytes(buf)

    def read_into(self, layer: int, expert: int, buf: memoryview) -> None:
        """Read the record into ``buf[:layout.nbytes]`` (gaps between tensors left as they are)."""
        exts = self.extents(layer, expert)
        for ext in exts:
            fd = self._fds.get(ext.path)
            if fd is None:
                fd = self._fds[ext.path] = os.open(ext.path, os.O_RDONLY)
            got = os.preadv(fd, [buf[ext.dest : ext.dest + ext.length]], ext.offset)
            if got != ext.length:
                raise CheckpointError(
                    f"short read of layer {layer} expert {expert} from {ext.path} "
                    f"({got} of {ext.length} bytes at {ext.offset}): file truncated?"
                )
        want = self.checksum(layer, expert)
        if want is not None and zlib.crc32(buf[: self.layout.nbytes]) != want:
            raise ChecksumError(
                f"checksum mismatch in layer {layer} expert {expert} of {exts[0].path} "
                f"(offset {exts[0].offset})"
            )

    def close(self) -> None:
        """Close the file descriptors that ``read_into`` keeps open."""
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def record_arrays(self, layer: int, expert: int) -> dict[str, np.ndarray]:
        """The record as numpy arrays by layout name (bf16 as its uint16 bit pattern)."""
        return record_to_arrays(self.layout, self.read_record(layer, expert))

    def expert_bytes_total(self) -> int:
        """Bytes of routed-expert tensors over all MoE layers (record padding excluded)."""
        per = sum(t.nbytes for t in self.layout.tensors)
        return per * self.num_experts * len(self.moe_layers)

    def dense_bytes(self) -> int:
        """Bytes of every non-expert tensor of the checkpoint."""
        return sum(t.nbytes for t in self._dense_tensors.values())

    def dense_tensors(self) -> dict[str, TensorInfo]:
        """Non-expert tensors by original checkpoint name (what ``pack`` copies as they are)."""
        return dict(self._dense_tensors)

    def describe(self) -> dict[str, Any]:
        """A summary of the store (what ``flashmoe inspect`` prints)."""
        return {
            "path": str(self.path),
            "kind": self.kind,
            "model_type": self.model_type,
            "layers": self.num_layers,
            "moe_layers": len(self.moe_layers),
            "experts_per_layer": self.num_experts,
            "experts_per_token": self.top_k,
            "record_bytes": self.layout.nbytes,
            "record_stride": self.record_stride,
            "expert_bytes_total": self.expert_bytes_total(),
            "dense_bytes": self.dense_bytes(),
            "quantization": self.quantization,
            "checksums": self._checksums is not None,
            "record_tensors": [
                {"name": t.name, "dtype": t.dtype, "shape": list(t.shape)}
                for t in self.layout.tensors
            ],
        }

    # -- internals --

    def _check(self, layer: int, expert: int) -> None:
        if layer not in self._file_idx:
            raise IndexError(f"layer {layer} has no routed experts (moe layers: {self.moe_layers})")
        if not 0 <= expert < self.num_experts:
            raise IndexError(f"expert {expert} out of range (0..{self.num_experts - 1})")

    def _file_id(self, path: str) -> int:
        try:
            return self._file_ids[path]
        except KeyError:
            self._file_ids[path] = len(self._files)
            self._files.append(path)
            return self._file_ids[path]

    def _index_checkpoint(self) -> None:
        """Classify a checkpoint's tensors into per-layer expert records and dense tensors."""
        tensors = read_tensor_index(self.path)
        self._file_ids: dict[str, int] = {}
        per_layer: dict[int, dict[str, list[TensorInfo]]] = {}
        specs: dict[int, dict[str, tuple[str, tuple[int, ...]]]] = {}
        found_mlx = any(_RE_MLX.match(k) for k in tensors)
        self.kind = "mlx" if found_mlx else "hf"
        self._global_quant = self._mlx_quantization() if found_mlx else None
        self._expert_quant: list[dict | None] = []  # the experts' own, once one bank is seen
        hf_experts: dict[tuple[int, str], dict[int, TensorInfo]] = {}
        E, H, I = self.num_experts, self._hidden, self._inter  # noqa: E741
        for name, info in tensors.items():
            if m := _RE_MLX.match(name):
                layer = int(m["layer"])
                self._bank_paths[layer] = _bank_path(m["prefix"], layer, m["block"])
                rec = f"{m['proj']}.{m['kind']}"
                self._check_mlx_shape(name, info, m["proj"], m["kind"])
                row = info.nbytes // E
                offs = [info.offset + e * row for e in range(E)]
                per_layer.setdefault(layer, {})[rec] = [
                    TensorInfo(info.path, o, row, info.dtype, info.shape[1:]) for o in offs
                ]
            elif m := _RE_HF.match(name):
                layer = int(m["layer"])
                self._bank_paths[layer] = _bank_path(m["prefix"], layer, m["block"])
                if m["kind"] == "weight_scale_inv":
                    raise CheckpointError(
                        f"{name}: fp8 block-quantized experts are not supported; "
                        "use a bf16 or mlx-community checkpoint"
                    )
                expert = int(m["expert"])
                if expert >= E:
                    raise CheckpointError(
                        f"config.json says {E} experts but {info.path} has {name}"
                    )
                rec = f"{_HF_PROJ.get(m['proj'], m['proj'])}.{m['kind']}"
                hf_experts.setdefault((layer, rec), {})[expert] = info
                prefix = f"{m['prefix']}layers.{layer}.{m['block']}.experts"
                specs.setdefault(layer, {})[rec] = (prefix, ())
            elif m := _RE_FUSED.match(name):
                layer = int(m["layer"])
                self._bank_paths[layer] = _bank_path(m["prefix"], layer, m["block"])
                recs = per_layer.setdefault(layer, {})
                rows = 2 * I if m["proj"] == "gate_up_proj" else H
                cols = H if m["proj"] == "gate_up_proj" else I
                if info.shape != (E, rows, cols):
                    raise CheckpointError(
                        f"{name} has shape {list(info.shape)} but config.json says "
                        f"[{E}, {rows}, {cols}] (experts, hidden, moe_intermediate_size)"
                    )
                blk = info.nbytes // E
                if m["proj"] == "down_proj":
                    recs["down_proj.weight"] = [
                        TensorInfo(info.path, info.offset + e * blk, blk, info.dtype, (H, I))
                        for e in range(E)
                    ]
                else:
                    half = blk // 2
                    for j, proj in enumerate(("gate_proj", "up_proj")):
                        recs[f"{proj}.weight"] = [
                            TensorInfo(
                                info.path,
                                info.offset + e * blk + j * half,
                                half,
                                info.dtype,
                                (I, H),
                            )
                            for e in range(E)
                        ]
            else:
                self._dense_tensors[name] = info
        for (layer, rec), by_expert in hf_experts.items():
            prefix = specs[layer][rec][0]
            missing = [e for e in range(E) if e not in by_expert]
            if missing:
                raise CheckpointError(
                    f"missing expert tensor {prefix}.{missing[0]}.{rec} "
                    f"({len(missing)} of {E} experts missing)"
                )
            want = (H, I) if rec.startswith("down_proj") else (I, H)
            for e, info in by_expert.items():
                if rec.endswith(".weight") and info.shape != want:
                    raise CheckpointError(
                        f"{prefix}.{e}.{rec} has shape {list(info.shape)} but config.json says "
                        f"{list(want)} (hidden_size, moe_intermediate_size)"
                    )
            per_layer.setdefault(layer, {})[rec] = [by_expert[e] for e in range(E)]
        self.quantization = self._expert_quant[0] if self._expert_quant else None
        self._build_tables(per_layer)

    def _mlx_quantization(self) -> dict | None:
        q = self.config.get("quantization") or self.config.get("quantization_config")
        if not q:
            return None
        return {
            "group_size": int(q["group_size"]),
            "bits": int(q["bits"]),
            "mode": q.get("mode", "affine"),
        }

    def _bank_quant(self, name: str) -> dict | None:
        # mlx-lm allows per-module overrides keyed by module path in config["quantization"]
        module = name.rsplit(".", 1)[0]
        q = self.config.get("quantization") or {}
        if isinstance(q.get(module), dict):
            return {"group_size": q[module]["group_size"], "bits": q[module]["bits"],
                    "mode": q[module].get("mode", "affine")}  # fmt: skip
        if q.get(module) is False:
            return None
        return self._global_quant

    def _check_mlx_shape(self, name: str, info: TensorInfo, proj: str, kind: str) -> None:
        E, H, I = self.num_experts, self._hidden, self._inter  # noqa: E741
        out_dim, in_dim = (H, I) if proj in ("down_proj", "fc2") else (I, H)
        q = self._bank_quant(name)
        if not self._expert_quant:
            self._expert_quant.append(q)
        elif q != self._expert_quant[0]:
            raise CheckpointError(
                f"{name}: quantization {q} differs from other experts' {self._expert_quant[0]}; "
                "mixed expert quantization is not supported"
            )
        if kind == "bias":
            want: tuple[int, ...] = (E, out_dim)
        elif q is None:
            want = (E, out_dim, in_dim)
        elif kind == "weight":
            want = (E, out_dim, in_dim * q["bits"] // 32)
        else:
            want = (E, out_dim, in_dim // q["group_size"])
        if info.shape != want:
            raise CheckpointError(
                f"{name} has shape {list(info.shape)} but config.json implies {list(want)} "
                f"(experts={E}, hidden_size={H}, moe_intermediate_size={I}, quantization={q})"
            )

    def _build_tables(self, per_layer: dict[int, dict[str, list[TensorInfo]]]) -> None:
        tc = _text_config(self.config)
        expected = _expected_moe_layers(self.model_type, tc) if self.num_experts > 0 else []
        for layer in expected:
            if layer not in per_layer:
                raise CheckpointError(
                    f"missing expert tensors for layer {layer} in {self.path} "
                    f"(config.json expects routed experts there)"
                )
        extra = sorted(set(per_layer) - set(expected))
        if extra:
            raise CheckpointError(
                f"layer {extra[0]} has expert tensors but config.json makes it a dense layer"
            )
        self.moe_layers = expected
        layout = None
        for layer in expected:
            recs = per_layer[layer]
            lay = make_layout([(n, v[0].dtype, v[0].shape) for n, v in recs.items()])
            for t in lay.tensors:
                if t.dtype not in ITEMSIZE:
                    raise CheckpointError(f"layer {layer} {t.name}: unsupported dtype {t.dtype}")
            if layout is None:
                layout = lay
                names = {t.name for t in lay.tensors}
                need = {"down_proj.weight"} if "gate_proj.weight" in names else {"fc1.weight"}
                if not need <= names:
                    raise CheckpointError(f"layer {layer}: incomplete expert bank {sorted(names)}")
            elif lay != layout:
                raise CheckpointError(
                    f"layer {layer}'s expert tensors differ from layer {expected[0]}'s "
                    "(names, dtypes or shapes)"
                )
            T = len(lay.tensors)
            fidx = np.zeros((T, self.num_experts), np.int32)
            foff = np.zeros((T, self.num_experts), np.int64)
            for t, spec in enumerate(lay.tensors):
                for e, info in enumerate(recs[spec.name]):
                    fidx[t, e] = self._file_id(info.path)
                    foff[t, e] = info.offset
            self._file_idx[layer] = fidx
            self._file_off[layer] = foff
        if layout is None:
            raise CheckpointError(f"{self.path}: no routed experts found")
        self.layout = layout
        self.record_stride = _roundup(layout.nbytes, RECORD_ALIGN)
        self.dense_dir = self.path

    def _index_packed(self, manifest: dict) -> None:
        mpath = self.path / "manifest.json"
        try:
            if manifest.get("version") != PACKED_VERSION:
                raise CheckpointError(
                    f"{mpath}: packed store version {manifest.get('version')} "
                    f"(this flashmoe reads {PACKED_VERSION})"
                )
            self.kind = "packed"
            self.layout = layout_from_json(manifest["layout"])
            self.quantization = manifest["quantization"]
            self.moe_layers = [int(x) for x in manifest["moe_layers"]]
            self.num_experts = int(manifest["num_experts"])
            self.top_k = int(manifest["top_k"])
            self.record_stride = int(manifest["record_stride"])
            self._bank_paths = {int(k): v for k, v in manifest["bank_paths"].items()}
            files = {int(k): v for k, v in manifest["files"].items()}
            self._checksums = {int(k): list(v) for k, v in manifest["checksums"].items()}
            dense_files = manifest["dense_files"]
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{mpath}: bad manifest ({e!r})") from None
        self._file_ids = {}
        E = self.num_experts
        for layer in self.moe_layers:
            f = self.path / files[layer]
            need = E * self.record_stride
            if not f.exists():
                raise CheckpointError(f"missing expert file {f}")
            if f.stat().st_size < need:
                raise CheckpointError(
                    f"{f} is truncated: {f.stat().st_size} bytes, manifest needs {need}"
                )
            if len(self._checksums[layer]) != E:
                raise CheckpointError(f"{mpath}: wrong number of checksums for layer {layer}")
            self._file_idx[layer] = np.full((1, E), self._file_id(str(f)), np.int32)
            self._file_off[layer] = (np.arange(E, dtype=np.int64) * self.record_stride)[None]
        for name in dense_files:
            self._dense_tensors.update(read_safetensors_header(self.path / name))
        self.dense_dir = self.path


def record_to_arrays(layout: RecordLayout, data: bytes | bytearray) -> dict[str, np.ndarray]:
    """Numpy views of a record's tensors (bf16 as uint16)."""
    return {
        t.name: np.frombuffer(
            data, NP_DTYPES[t.dtype], t.nbytes // ITEMSIZE[t.dtype], t.offset
        ).reshape(t.shape)
        for t in layout.tensors
    }


def _load_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"missing {path}") from None
    except ValueError as e:
        raise CheckpointError(f"{path}: bad JSON ({e})") from None


def open_store(path: str | os.PathLike) -> Store:
    """Open a checkpoint or packed store directory; detects its kind and validates it."""
    path = Path(path).absolute()
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a directory")
    manifest_path = path / "manifest.json"
    if manifest_path.exists():
        manifest = _load_json(manifest_path)
        if manifest.get("format") != PACKED_FORMAT:
            raise CheckpointError(f"{manifest_path}: not a {PACKED_FORMAT} manifest")
        store = Store(path, _load_json(path / "config.json"))
        store._index_packed(manifest)
        return store
    if (path / "experts").is_dir() or path.name.endswith(".partial"):
        raise CheckpointError(
            f"{path} is an incomplete packed store (no manifest.json); run flashmoe pack again"
        )
    store = Store(path, _load_json(path / "config.json"))
    store._index_checkpoint()
    return store


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return str(n)


def cmd_inspect(args: Any) -> int:
    """``flashmoe inspect MODEL [--json]``."""
    d = open_store(args.model).describe()
    if args.json:
        print(json.dumps(d, indent=2))
        return 0
    q = d["quantization"]
    qs = f"{q['bits']}-bit, group size {q['group_size']} ({q['mode']})" if q else "none"
    rows = [
        ("path", d["path"]),
        ("store kind", d["kind"] + (" (with checksums)" if d["checksums"] else "")),
        ("architecture", d["model_type"]),
        ("layers", d["layers"]),
        ("moe layers", d["moe_layers"]),
        ("experts per layer", d["experts_per_layer"]),
        ("experts per token", d["experts_per_token"]),
        ("bytes per expert", f"{d['record_bytes']:,} ({_human(d['record_bytes'])})"),
        ("total expert bytes", f"{d['expert_bytes_total']:,} ({_human(d['expert_bytes_total'])})"),
        ("dense bytes", f"{d['dense_bytes']:,} ({_human(d['dense_bytes'])})"),
        ("expert quantization", qs),
        ("record", ", ".join(f"{t['name']} {t['dtype']}{t['shape']}" for t in d["record_tensors"])),
    ]
    for k, v in rows:
        print(f"{k + ':':<21}{v}")
    return 0
