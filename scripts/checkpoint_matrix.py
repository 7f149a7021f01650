"""Every mlx-lm mixture-of-experts architecture x layout x quantization, streamed against mlx-lm.

Each row synthesizes a tiny checkpoint (``flashmoe synth``: published configs where synth has
them, else one filled from mlx-lm's ``ModelArgs``), generates 24 greedy tokens with mlx-lm in
float32 and with flashmoe at a quarter of the expert bytes, and reports ``identical``, the
first differing token, or the message the checkpoint is refused with. Prints a markdown table.

    .venv/bin/python scripts/checkpoint_matrix.py [ARCH ...] [--out DIR]
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx

HERE = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(HERE / "tests"))

PROMPT = "The expert pool holds"
N = 24
SIZES = {"layers": 2, "hidden": 128, "experts": 16, "topk": 2, "moe_inter": 64}
VARIANTS = [  # (layout, label, synth options); hf rows only for the mapped families
    ("mlx", "affine 4-bit", {"bits": 4}),
    ("mlx", "mixed_4_6", {"recipe": "mixed_4_6"}),
    ("mlx", "mxfp4", {"mode": "mxfp4"}),
    ("hf", "bf16", {}),
]


def moe_architectures() -> list[str]:
    """mlx-lm model modules that build a SwitchGLU / SwitchMLP bank (directly or through the
    module they import their MoE block from)."""
    import mlx_lm.models as models

    root = Path(models.__file__).parent
    direct = {f.stem for f in root.glob("*.py")
              if re.search(r"\bSwitch(GLU|MLP)\(", f.read_text())}
    found = set(direct)
    for f in root.glob("*.py"):
        imports = set(re.findall(r"from \.(\w+) import", f.read_text()))
        if imports & direct:
            found.add(f.stem)
    return sorted(found - {"switch_layers"})


def reference(path: Path) -> list[int]:
    from mlx_lm import load, stream_generate

    model, tok = load(str(path))
    model.set_dtype(mx.float32)
    ids = []
    for r in stream_generate(model, tok, PROMPT, max_tokens=N):
        if r.finish_reason == "stop":
            break
        ids.append(r.token)
    return ids


def streamed(path: Path) -> list[int]:
    from flashmoe.orchestrator.engine import Engine, GenRequest
    from flashmoe.store import open_store

    store = open_store(path)
    budget = max(store.expert_bytes_total() * 2 // 4, 1)
    with Engine(str(path), memory_budget=budget, workers=1, dtype="float32") as eng:
        return [t for c in eng.generate(GenRequest(id="m", max_tokens=N, prompt=PROMPT))
                for t in c.token_ids]


def row(arch: str, layout: str, opts: dict, root: Path) -> str:
    from flashmoe.checkpoint import HF_FAMILIES, canonical_model_type
    from flashmoe.errors import FlashMoeError
    from flashmoe.synth import synth

    if layout == "hf" and canonical_model_type(arch) not in HF_FAMILIES:
        return ""
    # hybrid models with one full-attention layer in four need four layers
    sizes = {**SIZES, "layers": 4} if arch.startswith(("qwen3_5", "qwen3_next")) else SIZES
    for seed in (5, 6, 7):  # random weights whose first greedy token is EOS compare nothing
        try:
            path = synth(root / f"{arch}-{layout}-{len(opts)}", arch, layout=layout, seed=seed,
                         force=True, **sizes, **opts)
        except Exception as e:  # noqa: BLE001 - the table reports whatever stops a row
            return f"not synthesized: {type(e).__name__}: {_short(e)}"
        try:
            want = reference(path)
        except Exception as e:  # noqa: BLE001 - mlx-lm itself cannot run this tiny model
            return f"mlx-lm cannot run it: {type(e).__name__}: {_short(e)}"
        if want:
            break
    try:
        got = streamed(path)
    except FlashMoeError as e:
        return f"refused: {_short(e)}"
    except Exception as e:  # noqa: BLE001
        return f"FAILED: {type(e).__name__}: {_short(e)}"
    if got == want:
        return f"identical ({len(got)} tokens)"
    first = next((i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b),
                 min(len(got), len(want)))
    return f"DIFFERS at token {first}"


def _short(e: Exception) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    text = re.sub(r"/\S*/", "", text)  # no machine paths in the table
    return text[:160].replace("|", "/")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("archs", nargs="*")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    archs = args.archs or moe_architectures()
    root = args.out or Path(tempfile.mkdtemp(prefix="fmx"))
    print("| architecture | layout | quantization | result |")
    print("| --- | --- | --- | --- |")
    t0 = time.time()
    for arch in archs:
        for layout, label, opts in VARIANTS:
            result = row(arch, layout, opts, root)
            if result:
                print(f"| {arch} | {layout} | {label} | {result} |", flush=True)
    print(f"\n{len(archs)} architectures in {time.time() - t0:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
