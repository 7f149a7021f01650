"""The expert store index: where each routed expert's bytes live on disk, and how a record is laid out.

One module opens all three kinds of store:

- ``hf``: an original Hugging Face checkpoint (per-expert or fused expert tensors, usually bf16);
- ``mlx``: an mlx-community quantized checkpoint (stacked ``switch_mlp`` weight/scales/biases);
- ``packed``: a store written by ``flashmoe pack`` (one aligned record per expert, with checksums).

A *record* is one expert's tensors, named relative to mlx-lm's expert bank after ``sanitize``
(``gate_proj.weight``, ``gate_proj.scales``, ``up_proj.weight``, ``down_proj.biases``,
``fc1.weight``, ...). Every MoE layer of a model has the same record layout. ``extents(layer,
expert)`` says which file ranges fill which byte ranges of the record.

STATUS: interface only; the implementation lands with the store/pack work.
"""

from __future__ import annotations

from dataclasses import dataclass

RECORD_ALIGN = 16384  # slot and packed-record alignment (Apple Silicon's page)


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
