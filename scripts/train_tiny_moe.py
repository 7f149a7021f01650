"""Train a tiny qwen3_moe from scratch on the Python standard library's source, with MLX.

The model is mlx-lm's own ``qwen3_moe.Model``; the tokenizer is a byte-level BPE trained with
``tokenizers`` on the same corpus: every ``.py`` file of this interpreter's standard library
(PSF licence), tests and generated codec tables left out, about 2 % of the files held out for the
held-out loss. Runs on MLX's default device (a GPU where MLX has one, the CPU otherwise), in
float32, seeded. The result is written in mlx layout at 4-bit with its tokenizer, a chat
template, ``training.json`` (corpus, settings, losses, speed) and a short model card.

    python scripts/train_tiny_moe.py          # the shipped model: 1200 steps, ~2 min on an H100
    python scripts/train_tiny_moe.py --steps 20 --out OUT   # a short run: measures tokens/s

The defaults are the shipped model's settings. On a CPU the same run takes a day or more; the
CPU path is for trying the script on smaller settings (``--layers 2 --hidden 128 --batch 4``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import sys
import sysconfig
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map
from mlx_lm.models import qwen3_moe

EOS = "<|endoftext|>"
SPECIALS = [EOS, "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SKIP_DIRS = {"site-packages", "__pycache__", "encodings"}
SAMPLE_PROMPTS = ["def read_lines(path):\n", 'class Stack:\n    """', "import os\nimport sys\n\n"]


def corpus_files() -> tuple[Path, list[Path]]:
    """The standard library's own .py files, sorted; tests, codec tables and build data skipped."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py")
             if not SKIP_DIRS & set(p.relative_to(root).parts[:-1])
             and not p.name.startswith("_sysconfigdata")]
    return root, sorted(files, key=lambda p: p.relative_to(root).as_posix())


def held_out(rel: str) -> bool:
    return int(hashlib.sha1(rel.encode()).hexdigest(), 16) % 50 == 0


def train_tokenizer(texts: list[str], vocab: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def save_hf_tokenizer(tok, out: Path) -> None:
    """tokenizer.json + tokenizer_config.json, as AutoTokenizer (mlx_lm.load) reads them."""
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS,
                                 unk_token=None, clean_up_tokenization_spaces=False)
    hf.chat_template = CHAT_TEMPLATE
    hf.save_pretrained(str(out))
    # The class name every transformers release knows, and the template where older ones look.
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(tokenizer_class="PreTrainedTokenizerFast", chat_template=CHAT_TEMPLATE)
    cfg_path.write_text(json.dumps(cfg, indent=2))


def prepare(data: Path, vocab: int) -> dict:
    """Tokenizer and token arrays in ``data`` (reused when present for the same vocab)."""
    meta_path = data / "corpus.json"
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta["vocab_size"] == vocab:
            return meta
    data.mkdir(parents=True, exist_ok=True)
    root, files = corpus_files()
    texts, rels = [], []
    for p in files:
        texts.append(p.read_text(encoding="utf-8", errors="replace"))
        rels.append(p.relative_to(root).as_posix())
    t0 = time.perf_counter()
    tok = train_tokenizer(texts, vocab)
    save_hf_tokenizer(tok, data / "tokenizer")
    eos = tok.token_to_id(EOS)
    split = {"train": [], "heldout": []}
    for rel, enc in zip(rels, tok.encode_batch(texts), strict=True):
        split["heldout" if held_out(rel) else "train"].append(np.array(enc.ids + [eos]))
    counts = {}
    for name, parts in split.items():
        arr = np.concatenate(parts).astype(np.uint16)
        np.save(data / f"{name}.npy", arr)
        counts[name] = int(arr.size)
    meta = {
        "source": f"Python {sys.version.split()[0]} standard library, "
                  f"lib/python{sys.version_info.major}.{sys.version_info.minor} (PSF licence)",
        "skipped": sorted(SKIP_DIRS) + ["_sysconfigdata*.py"],
        "files": len(rels),
        "heldout_files": [r for r in rels if held_out(r)],
        "bytes": sum(len(t.encode()) for t in texts),
        "tokens": counts,
        "vocab_size": vocab,
        "tokenizer": "byte-level BPE (tokenizers), specials " + ", ".join(SPECIALS),
        "sha256": hashlib.sha256("".join(texts).encode()).hexdigest(),
        "prepare_s": round(time.perf_counter() - t0, 1),
    }
    meta_path.write_text(json.dumps(meta, indent=1))
    return meta


def model_config(a, eos_id: int) -> dict:
    return {
        "model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"],
        "hidden_size": a.hidden, "num_hidden_layers": a.layers,
        "intermediate_size": 2 * a.hidden, "num_attention_heads": a.hidden // 64,
        "num_key_value_heads": max(1, a.hidden // 128), "head_dim": 64,
        "num_experts": a.experts, "num_experts_per_tok": a.topk, "decoder_sparse_step": 1,
        "mlp_only_layers": [], "moe_intermediate_size": a.moe_inter, "rms_norm_eps": 1e-6,
        "vocab_size": a.vocab, "rope_theta": 10000.0, "tie_word_embeddings": False,
        "max_position_embeddings": 4 * a.seq, "norm_topk_prob": True,
        "bos_token_id": eos_id, "eos_token_id": eos_id, "torch_dtype": "bfloat16",
    }


_GATES: list = []


class TapGate(nn.Linear):
    """The router's linear layer, recording its logits for the load-balancing loss."""

    def __call__(self, x):
        y = super().__call__(x)
        _GATES.append(y)
        return y


def build_model(config: dict) -> qwen3_moe.Model:
    model = qwen3_moe.Model(qwen3_moe.ModelArgs.from_dict(config))
    for layer in model.model.layers:
        layer.mlp.gate = TapGate(config["hidden_size"], config["num_experts"], bias=False)
    return model


def balance_loss(topk: int) -> mx.array:
    """Switch-Transformer auxiliary loss, E * sum_e f_e P_e (1 when routing is uniform): f_e the
    share of top-k choices that go to expert e, P_e its mean router probability."""
    total = 0.0
    for logits in _GATES:
        probs = mx.softmax(logits.reshape(-1, logits.shape[-1]), axis=-1)
        e = probs.shape[-1]
        top = mx.argpartition(-probs, kth=topk - 1, axis=-1)[:, :topk]
        share = mx.zeros((e,)).at[top.reshape(-1)].add(1.0) / top.size
        total = total + e * mx.sum(mx.stop_gradient(share) * probs.mean(axis=0))
    return total / len(_GATES)


def batches(tokens: np.ndarray, batch: int, seq: int, rng: np.random.Generator):
    while True:
        starts = rng.integers(0, tokens.size - seq - 1, size=batch)
        win = np.stack([tokens[s:s + seq + 1] for s in starts]).astype(np.int32)
        yield mx.array(win[:, :-1]), mx.array(win[:, 1:])


def train(a, meta: dict, work: Path) -> dict:
    mx.random.seed(a.seed)
    rng = np.random.default_rng(a.seed)
    train_tok = np.load(work / "data" / "train.npy")
    held_tok = np.load(work / "data" / "heldout.npy")
    eos_id = int(json.loads((work / "data" / "tokenizer" / "tokenizer.json").read_text())
                 ["added_tokens"][0]["id"])
    config = model_config(a, eos_id)
    model = build_model(config)
    mx.eval(model.parameters())
    nparams = sum(v.size for _, v in tree_flatten(model.parameters()))
    warm = min(a.warmup, a.steps // 10 + 1)
    sched = optim.join_schedules(
        [optim.linear_schedule(a.lr / 100, a.lr, warm),
         optim.cosine_decay(a.lr, max(1, a.steps - warm), a.lr / 10)], [warm])
    opt = optim.AdamW(learning_rate=sched, betas=[0.9, 0.95], weight_decay=0.1)

    def loss_fn(model, x, y):
        _GATES.clear()
        logits = model(x)
        ce = nn.losses.cross_entropy(logits, y, reduction="mean")
        aux = balance_loss(a.topk) if a.aux > 0 else mx.array(0.0)
        _GATES.clear()
        return ce + a.aux * aux, (ce, aux)

    grad_fn = nn.value_and_grad(model, loss_fn)

    def step(x, y):
        (_, (ce, aux)), grads = grad_fn(model, x, y)
        grads, _ = optim.clip_grad_norm(grads, 1.0)
        opt.update(model, grads)
        return ce, aux

    eval_rng = np.random.default_rng(a.seed + 1)
    eval_sets = {name: [next(batches(t, a.batch, a.seq, eval_rng)) for _ in range(a.eval_batches)]
                 for name, t in (("train", train_tok), ("heldout", held_tok))}

    def evaluate() -> dict:
        out = {}
        for name, bs in eval_sets.items():
            losses = []
            for x, y in bs:
                _GATES.clear()
                losses.append(nn.losses.cross_entropy(model(x), y, reduction="mean").item())
            _GATES.clear()
            out[name] = float(np.mean(losses))
        return out

    log, evals, best = [], [], {"heldout": math.inf}
    stream = batches(train_tok, a.batch, a.seq, rng)
    t_start = time.perf_counter()
    train_s = 0.0
    per_step = a.batch * a.seq
    for it in range(1, a.steps + 1):
        x, y = next(stream)
        t0 = time.perf_counter()
        ce, aux = step(x, y)
        mx.eval(ce, aux, model.parameters(), opt.state)
        dt = time.perf_counter() - t0
        train_s += dt
        log.append({"step": it, "loss": round(ce.item(), 4), "aux": round(aux.item(), 4),
                    "lr": float(sched(it)), "tok_s": round(per_step / dt, 1)})
        if it % a.log_every == 0 or it == 1:
            print(f"step {it}/{a.steps} loss {ce.item():.3f} aux {aux.item():.3f} "
                  f"{per_step / dt:.0f} tok/s  {time.perf_counter() - t_start:.0f}s", flush=True)
        if it % a.eval_every == 0 or it == a.steps:
            ev = evaluate() | {"step": it, "elapsed_s": round(time.perf_counter() - t_start, 1)}
            evals.append(ev)
            print(f"eval step {it}: train {ev['train']:.3f} heldout {ev['heldout']:.3f}",
                  flush=True)
            if ev["heldout"] < best["heldout"]:
                best = ev
                mx.save_safetensors(str(work / "best.safetensors"),
                                    dict(tree_flatten(model.parameters())))
    wall = time.perf_counter() - t_start
    # Export the weights of the lowest held-out loss: past it the model memorizes the corpus.
    model.load_weights(str(work / "best.safetensors"))
    stats = {
        "device": f"{mx.default_device()} ({mx.device_info().get('device_name', '?')})",
        "parameters": int(nparams),
        "steps": a.steps, "tokens_seen": a.steps * per_step,
        "epochs": round(a.steps * per_step / train_tok.size, 2),
        "wall_s": round(wall, 1), "train_s": round(train_s, 1),
        **speed(log, per_step),
        "exported_step": best["step"],
        "final_train_loss": best["train"], "final_heldout_loss": best["heldout"],
        "evals": evals,
    }
    (work / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    plot(log, evals, work / "loss.png")
    return {"config": config, "model": model, "stats": stats}


def speed(log: list, per_step: int) -> dict:
    """Tokens/s from the second step on: the first one includes compiling the kernels (on CUDA,
    tens of seconds)."""
    secs = [per_step / r["tok_s"] for r in log]
    rest = sum(secs[1:])
    return {"first_step_s": round(secs[0], 1),
            "tokens_per_s": round(per_step * (len(secs) - 1) / rest, 1) if rest else None}


def plot(log: list, evals: list, path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no loss plot", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in log], [r["loss"] for r in log], lw=0.6, label="train (batch)")
    for key in ("train", "heldout"):
        ax.plot([e["step"] for e in evals], [e[key] for e in evals], "o-", label=f"{key} (eval)")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def export(model: qwen3_moe.Model, config: dict, work: Path, out: Path, record: dict) -> None:
    """bfloat16, then 4-bit affine (group 64) with mlx-lm's helpers; tokenizer and card beside."""
    from mlx_lm import generate, load
    from mlx_lm.utils import quantize_model, save_config, save_model

    for layer in model.model.layers:  # back to a plain router: the checkpoint holds weights only
        w = layer.mlp.gate.weight
        layer.mlp.gate = nn.Linear(*reversed(w.shape), bias=False)
        layer.mlp.gate.weight = w
    model.update(tree_map(lambda p: p.astype(mx.bfloat16), model.parameters()))
    model, qconfig = quantize_model(model, config, group_size=64, bits=4)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    save_model(out, model)
    save_config(qconfig, out / "config.json")
    for f in (work / "data" / "tokenizer").iterdir():
        shutil.copy(f, out / f.name)
    loaded, tok = load(str(out))
    samples = {p: generate(loaded, tok, prompt=p, max_tokens=60, verbose=False)
               for p in SAMPLE_PROMPTS}
    record["samples"] = samples
    (out / "training.json").write_text(json.dumps(record, indent=1))
    (out / "README.md").write_text(model_card(record))


def model_card(r: dict) -> str:
    c, s, t = r["corpus"], r["stats"], r["settings"]
    samples = "\n".join(f"Prompt `{p!r}`:\n\n```python\n{p}{g}\n```\n"
                        for p, g in r["samples"].items())
    return f"""# tiny-pystdlib-moe

A {s['parameters'] / 1e6:.1f}M-parameter qwen3_moe ({t['layers']} layers, hidden {t['hidden']},
{t['experts']} experts per layer, top-{t['topk']}, expert width {t['moe_inter']}) trained from
scratch by `scripts/train_tiny_moe.py`, stored here in mlx layout at 4-bit (group 64, bfloat16
scales). It is a test fixture and demo model: it writes Python-looking text, nothing more.

- Trained on: {c['source']}, {c['files']} files, {c['bytes'] / 1e6:.1f} MB, {c['tokens']['train']:,}
  training tokens and {c['tokens']['heldout']:,} held-out tokens ({len(c['heldout_files'])} files);
  {c['tokenizer']}, vocabulary {c['vocab_size']}.
- How long: {s['steps']} steps of {t['batch']} x {t['seq']} tokens ({s['epochs']} epochs),
  {s['wall_s'] / 60:.1f} minutes on {s['device']} ({s['tokens_per_s']:.0f} tokens/s after a first
  step of {s['first_step_s']} s), seed {t['seed']}.
- Loss of the weights shipped (float32, nats/token; those of step {s['exported_step']}, the
  lowest held-out loss of the evaluations): train {s['final_train_loss']:.3f},
  held-out {s['final_heldout_loss']:.3f}.
- Chat template: ChatML markers (`<|im_start|>`, `<|im_end|>`); the model never saw a chat.

Everything else (settings, loss at each evaluation) is in `training.json`.

## Greedy samples (this 4-bit checkpoint)

{samples}"""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("models/tiny-pystdlib-moe"))
    p.add_argument("--work", type=Path, default=Path(".train"),
                   help="data, float weights, log and loss plot (not committed)")
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--topk", type=int, default=4)
    p.add_argument("--moe-inter", type=int, default=128)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--aux", type=float, default=0.01, help="load-balancing loss weight")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--log-every", type=int, default=250)
    p.add_argument("--prepare-only", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.hidden % 128 or a.topk > a.experts or a.steps < 1:
        print("error: --hidden must be a multiple of 128, --topk <= --experts, --steps >= 1",
              file=sys.stderr)
        return 2
    meta = prepare(a.work / "data", a.vocab)
    print(f"corpus: {meta['files']} files, {meta['bytes']:,} bytes, tokens {meta['tokens']}",
          flush=True)
    if a.prepare_only:
        return 0
    print(f"device {mx.default_device()}", flush=True)
    res = train(a, meta, a.work)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()
                if k not in ("out", "work", "prepare_only")}
    record = {"corpus": meta, "settings": settings, "stats": res["stats"],
              "mlx": mx.__version__, "python": sys.version.split()[0]}
    export(res["model"], res["config"], a.work, a.out, record)
    if (a.work / "loss.png").exists():
        shutil.copy(a.work / "loss.png", a.out / "loss.png")
    print(json.dumps({k: v for k, v in res["stats"].items() if k != "evals"}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
