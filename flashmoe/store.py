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
import math
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from flashmoe.banks import Bank, model_tree
from flashmoe.checkpoint import dropped_parts, ignored_reason, sort_tensors
from flashmoe.config_check import check_config
from flashmoe.errors import CheckpointError, ChecksumError
from flashmoe.hub import resolve_model

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
    "F8_E4M3": "float8_e4m3",
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
    "float8_e4m3": np.uint8,  # FP8 codes; only ``pack`` reads them (it converts them)
}
ITEMSIZE = {k: np.dtype(v).itemsize for k, v in NP_DTYPES.items()}

PROJ_ORDER = ("gate_proj", "up_proj", "down_proj", "fc1", "fc2")
KIND_ORDER = ("weight", "scales", "biases", "bias", "weight_scale_inv")
FP8_BLOCK = 128  # FP8 checkpoints scale 128x128 blocks (weight_scale_inv), as mlx-lm reads them


def _roundup(n: int, a: int) -> int:
    return (n + a - 1) // a * a


def _tensor_sort_key(name: str) -> tuple[int, int, int]:
    proj, kind = name.rsplit(".", 1)
    base, _, variant = proj.partition("~")  # "down_proj~2": layers stored another way
    return PROJ_ORDER.index(base), int(variant or 0), KIND_ORDER.index(kind)


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
        dtype, shape = _ST_DTYPES.get(h["dtype"], h["dtype"]), tuple(h["shape"])
        if not all(type(x) is int and x >= 0 for x in (begin, stop, *shape)) or begin > stop or (
            dtype in ITEMSIZE and math.prod(shape) * ITEMSIZE[dtype] != stop - begin
        ):
            raise CheckpointError(f"{path}: bad header entry for {name[:100]}")
        out[name] = TensorInfo(str(path), base + begin, stop - begin, dtype, shape)
        end = max(end, base + stop)
    if size < end:
        raise CheckpointError(f"{path} is truncated: {size} bytes, its header needs {end}")
    if size > end:  # the format indexes every byte: a shorter header shifts every tensor
        raise CheckpointError(f"{path}: {size - end} bytes after the last tensor (bad header?)")
    return out


def _shard_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"{index}: bad index ({e})") from None
        names = set(weight_map.values()) if isinstance(weight_map, dict) else {None}
        if not all(isinstance(f, str) and f and f == Path(f).name for f in names):
            raise CheckpointError(f"{index}: weight_map must map names to shard files of {path}")
        return [path / f for f in sorted(names)]
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


# --- configs ------------------------------------------------------------------------------------


def text_config(config: dict) -> dict:
    """The language model's settings (multimodal configs nest them under ``text_config``)."""
    tc = config.get("text_config")
    return tc if isinstance(tc, dict) and "num_hidden_layers" in tc else config


def _quant_settings(config: dict) -> dict:
    q = config.get("quantization")
    return q if isinstance(q, dict) else {}


def _mode(scales_dtype: str, bits: int, group: int, name: str) -> str:
    # as mlx-lm infers it: only affine keeps its scales in a float dtype; each other mode has
    # exactly one (bits, group size)
    if scales_dtype != "uint8":
        return "affine"
    modes = {(4, 16): "nvfp4", (4, 32): "mxfp4", (8, 32): "mxfp8"}
    if (bits, group) not in modes:
        raise CheckpointError(f"{name}: cannot tell the quantization mode of {bits} bits with "
                              f"group size {group} and uint8 scales")
    return modes[(bits, group)]


def union_layout(variants: list[tuple[RecordLayout, dict]]) -> tuple[RecordLayout,
                                                                     list[dict[str, str]]]:
    """One record layout that holds every layer's experts, and each variant's record name per
    projection. Layers whose projection is stored the same way share its tensors; a projection
    stored another way (mixed bits per layer) gets tensors of its own, ``proj~N``, so a cache slot
    has room for each way and every layer computes with exactly its own tensors."""
    specs: list[tuple[str, str, tuple[int, ...]]] = []
    taken: dict[str, tuple] = {}  # record name -> (tensors, quantization)
    names = []
    for i, (lay, quant) in enumerate(variants):
        own = {}
        for proj in sorted({t.name.split(".")[0] for t in lay.tensors}):
            tensors = tuple((t.name.split(".", 1)[1], t.dtype, t.shape) for t in lay.tensors
                            if t.name.split(".")[0] == proj)
            key = (tensors, quant.get(proj))
            same = [n for n, k in taken.items() if n.split("~")[0] == proj and k == key]
            if same:
                own[proj] = same[0]
                continue
            name = proj if proj not in taken else f"{proj}~{i}"
            taken[name] = key
            specs += [(f"{name}.{kind}", dtype, shape) for kind, dtype, shape in tensors]
            own[proj] = name
        names.append(own)
    return make_layout(specs), names


def _renamed(tensor: str, names: dict[str, str]) -> str:
    proj, kind = tensor.split(".", 1)
    return f"{names[proj]}.{kind}"


def _experts(bank: Bank) -> int:
    counts = {p.experts for p in bank.projs.values()}
    if len(counts) != 1:
        raise CheckpointError(f"{bank.path}: projections disagree on the number of experts")
    return counts.pop()


def _summary(quant: dict[str, dict | None]) -> dict | None:
    """One quantization for the whole record when every projection shares it, else the
    projections' own (``{proj: settings or None}``)."""
    distinct = {json.dumps(q, sort_keys=True) for q in quant.values()}
    if len(distinct) == 1:
        return next(iter(quant.values()))
    return quant


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
        self.num_layers = int(text_config(config).get("num_hidden_layers") or 0)
        self.fp8 = False  # experts are FP8 block-scaled: ``flashmoe pack`` converts them
        check_config(path, config, text_config(config))
        self._checksums: dict[int, list[int]] | None = None
        self._bank_paths: dict[int, str] = {}
        self._dense_tensors: dict[str, TensorInfo] = {}
        self._ignored: dict[str, list[int]] = {}  # part -> [tensors, bytes]
        self._files: list[str] = []
        self._file_idx: dict[int, np.ndarray] = {}  # layer -> [tensors, experts] index in _files
        self._file_off: dict[int, np.ndarray] = {}  # layer -> [tensors, experts] file offsets
        self._fds: dict[str, int] = {}
        self._projs: dict[int, dict[str, str]] = {}  # layer -> {projection: record name}
        self._specs: dict[int, list[TensorSpec]] = {}  # layer -> the record tensors it fills


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
            for t, spec in enumerate(self._specs[layer])
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
        return self.num_experts * sum(t.nbytes for layer in self.moe_layers
                                      for t in self._specs[layer])

    def projections(self, layer: int) -> dict[str, str]:
        """The record's name for each projection of ``layer``'s bank: the projection's own,
        or ``proj~N`` where layers store it another way (mixed bits per layer)."""
        self._check(layer, 0)
        return dict(self._projs[layer])

    def dense_bytes(self) -> int:
        """Bytes of every non-expert tensor of the checkpoint."""
        return sum(t.nbytes for t in self._dense_tensors.values())

    def dense_tensors(self) -> dict[str, TensorInfo]:
        """Non-expert tensors by original checkpoint name (what ``pack`` copies as they are)."""
        return dict(self._dense_tensors)

    def ignored_parts(self) -> dict[str, list[int]]:
        """What the checkpoint holds that mlx-lm never loads (MTP layers, vision and audio
        towers): ``{part: [tensors, bytes]}``; neither experts nor dense bytes."""
        return {k: list(v) for k, v in self._ignored.items()}

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
            "ignored": [{"part": k, "tensors": n, "bytes": b}
                        for k, (n, b) in sorted(self._ignored.items())],
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
        """Find the expert banks in mlx-lm's model tree and their tensors in the checkpoint."""
        tree = model_tree(self.config, str(self.path / "config.json"))
        tensors = read_tensor_index(self.path)
        self.top_k = tree.top_k
        self.num_layers = tree.num_layers
        found = sort_tensors(tensors, tree, self.num_layers)
        self.kind = found.kind
        self._dense_tensors = found.dense
        drop = dropped_parts(tree)
        for name, info in found.ignored.items():
            part = self._ignored.setdefault(ignored_reason(name, drop, self.num_layers), [0, 0])
            part[0] += 1
            part[1] += info.nbytes
        self._file_ids: dict[str, int] = {}
        self.moe_layers = sorted(tree.banks)
        variants: list[tuple[RecordLayout, dict]] = []
        own: dict[int, tuple[int, dict[str, list[TensorInfo]]]] = {}
        for layer in self.moe_layers:
            bank = tree.banks[layer]
            recs = found.experts.get(layer)
            if not recs:
                raise CheckpointError(
                    f"missing expert tensors for layer {layer} in {self.path} "
                    f"(mlx-lm's model has an expert bank there: {bank.path})"
                )
            quant = {p: self._proj_quant(bank, p, recs) for p in sorted(bank.projs)}
            lay = make_layout([(n, v[0].dtype, v[0].shape) for n, v in recs.items()])
            if (lay, quant) not in variants:
                variants.append((lay, quant))
            own[layer] = variants.index((lay, quant)), recs
            self._bank_paths[layer] = bank.path
        self.num_experts = _experts(tree.banks[self.moe_layers[0]])
        if any(_experts(tree.banks[layer]) != self.num_experts for layer in self.moe_layers):
            raise CheckpointError(f"{self.path}: layers differ in their number of experts")
        self.layout, names = union_layout(variants)
        self.quantization = _summary({names[i][p]: q for i, (_, qs) in enumerate(variants)
                                      for p, q in qs.items()})
        for layer, (i, recs) in own.items():
            self._projs[layer] = names[i]
            specs = [self.layout.tensor(_renamed(t.name, names[i])) for t in variants[i][0].tensors]
            self._specs[layer] = specs
            fidx = np.zeros((len(specs), self.num_experts), np.int32)
            foff = np.zeros((len(specs), self.num_experts), np.int64)
            for t, orig in enumerate(variants[i][0].tensors):
                for e, info in enumerate(recs[orig.name]):
                    fidx[t, e] = self._file_id(info.path)
                    foff[t, e] = info.offset
            self._file_idx[layer] = fidx
            self._file_off[layer] = foff
        self.record_stride = _roundup(self.layout.nbytes, RECORD_ALIGN)
        self.dense_dir = self.path

    def _proj_quant(self, bank: Bank, proj: str, recs: dict[str, list[TensorInfo]]) -> dict | None:
        """How one projection of a bank is stored (None: plain weights), checked against the
        shapes mlx-lm's model gives it; the quantization is found as mlx-lm's loader finds it
        (the config's entry for the module, else the tensors' shapes and scales dtype)."""
        p = bank.projs[proj]
        name = f"{bank.path}.{proj}"
        first = {k.split(".", 1)[1]: v[0] for k, v in recs.items() if k.split(".")[0] == proj}
        unknown = set(first) - {"weight", "scales", "biases", "bias", "weight_scale_inv"}
        if "global_scale" in unknown:
            raise CheckpointError(
                f"{name}: nvfp4 with a per-expert global_scale is not streamed (its float32 "
                "scale would be cached in the compute dtype, which is not exact on a GPU)"
            )
        if unknown:
            raise CheckpointError(f"{name}: unknown expert tensor kinds {sorted(unknown)}")
        if "weight" not in first:
            raise CheckpointError(f"{name}.weight is missing from {self.path}")
        w, s = first["weight"], first.get("scales")
        want: dict[str, tuple[int, ...]] = {}
        q = None
        if "weight_scale_inv" in first:
            self.fp8 = True
            if w.dtype != "float8_e4m3":
                raise CheckpointError(f"{name}.weight_scale_inv beside a {w.dtype} weight")
            blocks = (-(-p.out_dim // FP8_BLOCK), -(-p.in_dim // FP8_BLOCK))
            want = {"weight": (p.out_dim, p.in_dim), "weight_scale_inv": blocks}
        elif s is None:
            want = {"weight": (p.out_dim, p.in_dim)}
        else:
            q = _quant_settings(self.config).get(name)
            if not isinstance(q, dict):
                group = p.in_dim // max(1, s.shape[-1])
                bits = w.shape[-1] * 32 // p.in_dim
                q = {"group_size": group, "bits": bits, "mode": _mode(s.dtype, bits, group, name)}
            q = {"group_size": int(q["group_size"]), "bits": int(q["bits"]),
                 "mode": q.get("mode", "affine")}  # fmt: skip
            want = {"weight": (p.out_dim, p.in_dim * q["bits"] // 32),
                    "scales": (p.out_dim, p.in_dim // q["group_size"])}  # fmt: skip
            if q["mode"] == "affine":
                want["biases"] = want["scales"]
        if p.bias:
            want["bias"] = (p.out_dim,)
        for kind, info in first.items():
            if kind not in want:
                raise CheckpointError(f"{name}.{kind} is not a tensor of mlx-lm's {proj} "
                                      f"(quantization {q})")
            if tuple(info.shape) != want[kind]:
                raise CheckpointError(
                    f"{name}.{kind} has shape {list(info.shape)} per expert but config.json "
                    f"implies {list(want[kind])} (quantization {q})"
                )
        missing = set(want) - set(first)
        if missing:
            raise CheckpointError(f"{name}.{sorted(missing)[0]} is missing from {self.path}")
        return q


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
            projs = manifest.get("projections", {})
            self._ignored = {k: list(v) for k, v in manifest.get("ignored", {}).items()}
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
            self._projs[layer] = projs.get(str(layer)) or {
                t.name.split(".")[0]: t.name.split(".")[0] for t in self.layout.tensors}
            self._specs[layer] = [t for t in self.layout.tensors
                                  if t.name.split(".")[0] in self._projs[layer].values()]
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
        obj = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"missing {path}") from None
    except ValueError as e:
        raise CheckpointError(f"{path}: bad JSON ({e})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    return obj


def open_store(path: str | os.PathLike, convert: bool = False) -> Store:
    """Open a checkpoint or packed store directory (or a Hugging Face repository id, see
    ``flashmoe.hub``); detects its kind and validates it. A store whose experts must be
    converted before they stream (FP8 block-scaled) opens only with ``convert``.

    Raises:
        CheckpointError: for every malformed file of the store (config, index, headers).
    """
    path = resolve_model(path).absolute()
    try:
        return _open_store(path, convert)
    except (KeyError, IndexError, TypeError, ValueError, AttributeError, OverflowError) as e:
        # metadata of an unexpected shape reached code that trusted it
        msg = f"{path}: malformed checkpoint metadata ({type(e).__name__}: {e})"
        raise CheckpointError(msg[:300]) from e


def _open_store(path: Path, convert: bool) -> Store:
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
    if store.fp8 and not convert:
        raise CheckpointError(
            f"{path}: the experts are FP8 block-scaled (e4m3 with weight_scale_inv), which "
            "flashmoe does not stream in place; `flashmoe pack MODEL OUT` converts them exactly "
            "as mlx-lm does (to bf16; --bits 4 or 8 re-quantizes them)"
        )
    return store


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return str(n)


def _quant_text(q: dict | None) -> str:
    if not q:
        return "none"
    if "bits" not in q:  # per projection
        return "; ".join(f"{p}: {_quant_text(v)}" for p, v in q.items())
    return f"{q['bits']}-bit, group size {q['group_size']} ({q['mode']})"


def cmd_inspect(args: Any) -> int:
    """``flashmoe inspect MODEL [--json]``."""
    store = open_store(args.model, convert=True)
    d = store.describe()
    if getattr(args, "memory_budget", None):
        from flashmoe.orchestrator.pool_plan import inspect_budget

        d["pool"], pool_rows = inspect_budget(store, args.memory_budget)
    if args.json:
        print(json.dumps(d, indent=2))
        return 0
    qs = _quant_text(d["quantization"])
    ignored = ", ".join(f"{p['part']} ({p['tensors']} tensors, {_human(p['bytes'])})"
                        for p in d["ignored"]) or "none"
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
        ("ignored", ignored),
        ("expert quantization", qs),
        ("record", ", ".join(f"{t['name']} {t['dtype']}{t['shape']}" for t in d["record_tensors"])),
    ]
    for k, v in rows + (pool_rows if "pool" in d else []):
        print(f"{k + ':':<21}{v}")
    return 0
