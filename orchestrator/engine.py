"""The engine: an mlx-lm model whose expert banks stream from the store, and the requests on it.

The engine works on one model. It loads the dense weights with mlx-lm (lazily, so expert tensors
are never read), swaps every expert bank for a streamed one, starts the loader workers and the
shared-memory pool, and generates with mlx-lm's own ``generate_step``, sampler, KV caches and
detokenizer. ``generate`` runs in the caller's thread (``flashmoe run``); ``start``/``submit`` run
requests on an engine thread for the daemon.
"""

from __future__ import annotations

import functools
import os
import queue
import resource
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.generate import generate_step
from mlx_lm.utils import _get_classes, load_model, load_tokenizer

from flashmoe.banks import find_banks
from flashmoe.configs import OFF_WORDS, ON_WORDS, ConfigError, Settings, load_settings, parse_size
from flashmoe.errors import CheckpointError, FlashMoeError
from flashmoe.orchestrator.budget import check_request, kv_args, plan_for_engine
from flashmoe.orchestrator.cache import ExpertCache
from flashmoe.orchestrator.cuda_copy import make_copier
from flashmoe.orchestrator.kv_ledger import KvLedger
from flashmoe.orchestrator.loaders import LoaderPool
from flashmoe.orchestrator.pool_plan import plan_for
from flashmoe.orchestrator.prefix_cache import PrefixCache
from flashmoe.orchestrator.sampling import StopText, sampler_for, token_logprobs
from flashmoe.orchestrator.scheduler import Chunk, GenRequest, Lanes, Scheduler, check_finite
from flashmoe.orchestrator.streamed import install_streamed_banks
from flashmoe.protocol.request import RequestError, prompt_bytes
from flashmoe.shm.pool import ExpertPool, cleanup_stale
from flashmoe.store import open_store

_DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


def resolve_dtype(name: str, config: dict) -> mx.Dtype:
    """``auto``: float32 on the CPU backend (bf16 is slow there and gather_mm needs f32),
    the checkpoint's own dtype on a GPU."""
    if name != "auto":
        return _DTYPES[name]
    if mx.default_device() == mx.cpu:
        return mx.float32
    return _checkpoint_dtype(config)


def casts_model(setting: str, compute: mx.Dtype, config: dict) -> bool:
    """Whether the whole model is cast to ``compute``: an explicit dtype, or "auto" where it
    differs from the checkpoint's (the CPU); "auto" on a GPU keeps the checkpoint's dtypes."""
    return setting != "auto" or compute != _checkpoint_dtype(config)


def _checkpoint_dtype(config: dict) -> mx.Dtype:
    text = config.get("text_config", config)
    declared = text.get("torch_dtype") or text.get("dtype") or config.get("torch_dtype")
    return _DTYPES.get(str(declared), mx.bfloat16)


def _config_override(config: dict, experts_per_token: int | None) -> dict | None:
    if experts_per_token is None:
        return None
    if experts_per_token < 1:
        raise FlashMoeError(f"--experts-per-token must be >= 1, got {experts_per_token}")
    if "text_config" in config:
        return {"text_config": {**config["text_config"], "num_experts_per_tok": experts_per_token}}
    return {"num_experts_per_tok": experts_per_token}


def load_dense(path: Path, model_config: dict | None) -> tuple[nn.Module, dict]:
    """mlx-lm's ``load_model``, lazily, checking that every non-expert parameter was in the
    checkpoint (mlx-lm's strict check would also demand the experts a packed store leaves out)."""

    def classes(config):
        model_cls, args_cls = _get_classes(config)

        class DenseChecked(model_cls):
            def load_weights(self, weights, strict=True):
                names = {k for k, _ in weights}
                banks = tuple(p + "." for p, _, _ in find_banks(self))
                missing = [k for k, _ in tree_flatten(self.parameters())
                           if k not in names and not k.startswith(banks)]
                if missing:
                    raise CheckpointError(f"{path}: {len(missing)} dense tensors missing from "
                                          f"the checkpoint, e.g. {missing[0]}")
                return super().load_weights(weights, strict=False)

        DenseChecked.__name__ = model_cls.__name__
        return DenseChecked, args_cls

    try:
        return load_model(path, lazy=True, strict=False, model_config=model_config,
                          get_model_classes=classes)
    except (ValueError, FileNotFoundError, KeyError) as e:
        raise CheckpointError(f"{path}: {e}") from None


def resolve_lanes(setting: str, cache_slots: int, num_experts: int) -> int:
    """Compute lanes: ``auto`` = one per CPU core (up to 4) on the CPU backend, 1 on a GPU;
    never more than the cache can serve without running out of unpinned slots (a lane pins at
    most one layer's experts plus its prefetch guesses, a few per coming layer)."""
    if str(setting) == "auto":
        n = min(4, os.cpu_count() or 1) if mx.default_device() == mx.cpu else 1
    else:
        try:
            n = int(setting)
        except ValueError:
            n = 0
        if n < 1:
            raise ConfigError(f"setting lanes: expected auto or a number >= 1, got {setting!r}")
    while n > 1 and cache_slots < n * 2 * num_experts:
        n -= 1
    return n


def resolve_switch(setting, name: str, auto: bool) -> bool:
    """An on/off setting that may also be ``auto`` (then ``auto``)."""
    v = str(setting).strip().lower()
    if v == "auto":
        return auto
    if v in ON_WORDS:
        return True
    if v in OFF_WORDS:
        return False
    raise ConfigError(f"setting {name}: expected auto, on or off, got {setting!r}")


def resolve_prefetch(setting) -> bool:
    """Prefetch: ``auto`` = on a GPU, where decode waits on the disk and the host would leave it
    idle while it routes (on the CPU backend compute dominates and guesses gained nothing)."""
    return resolve_switch(setting, "prefetch", mx.default_device() != mx.cpu)


def make_loader(s: Settings, pool: ExpertPool) -> LoaderPool:
    """The loader workers the settings ask for, filling ``pool``'s slots."""
    return LoaderPool(pool, workers=s.workers, threads=s.io_threads, io_mode=s.io_mode,
                      chunk_bytes=parse_size(s.io_chunk),
                      guess_threads=s.prefetch_threads or None,
                      start_timeout_s=s.worker_start_timeout_s, load_timeout_s=s.load_timeout_s)


class Engine:
    """A loaded model with streamed experts. See the module docstring."""

    def __init__(self, model: str, settings: Settings | None = None, *,
                 memory_budget: str | int | None = None, workers: int | None = None,
                 io_threads: int | None = None, dtype: str | None = None,
                 experts_per_token: int | None = None, max_batch: int = 8,
                 lanes: str | int | None = None, max_context: int | str | None = None,
                 kv_bits: int | None = None, stage=None):
        self.max_batch = max_batch
        self.stage = stage  # a pipeline stage (orchestrator/distributed.py), or None
        self.settings = s = (settings or load_settings()).with_overrides(
            memory_budget=None if memory_budget is None else str(memory_budget),
            workers=workers, io_threads=io_threads, dtype=dtype,
            lanes=None if lanes is None else str(lanes),
            max_context=None if max_context is None else str(max_context), kv_bits=kv_bits)
        self.model_path = Path(model)
        self.model_name = self.model_path.name
        self.store = open_store(self.model_path)
        if stage is not None:
            stage.narrow(self.store)
        self.compute_dtype = resolve_dtype(s.dtype, self.store.config)
        top_k = experts_per_token or self.store.top_k
        if not 1 <= top_k <= self.store.num_experts:
            raise FlashMoeError(f"--experts-per-token must be in 1..{self.store.num_experts} "
                                f"(the model's expert count), got {top_k}")
        cast = casts_model(s.dtype, self.compute_dtype, self.store.config)
        bp = self.budget_plan = plan_for_engine(self.store, s.memory_budget, self.compute_dtype,
                                                cast, s, stage and stage.layers)
        self.max_context, budget = bp.max_context, bp.budget
        self.plan = plan_for(self.store, s, bp.pool_bytes, self.compute_dtype, top_k)
        self.budget = budget
        self._closed = False
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue = queue.Queue()
        self._cancelled: set[str] = set()
        self.requests_served = 0
        self.tokens_generated = 0
        self.started = time.time()
        self._last_tps = 0.0
        cleanup_stale()
        self.pool = ExpertPool.create(self.plan.staging_slots, self.plan.staging_slot_bytes)
        try:
            self.loader = make_loader(s, self.pool)
            self.lanes = resolve_lanes(s.lanes, self.plan.cache_slots, self.store.num_experts)
            prefetch = resolve_prefetch(s.prefetch)
            self.cache = ExpertCache(self.store.layout, self.plan, self.compute_dtype,
                                     self.loader, self.pool, self.store,
                                     load_timeout_s=4 * s.load_timeout_s,
                                     shared=self.lanes > 1, prefetch_depth=s.prefetch_depth)
            self.cache.copier = make_copier(self.cache, self.pool)  # None unless on CUDA
            override = _config_override(self.store.config, experts_per_token)
            self.model, self.config = load_dense(self.store.dense_dir, override)
            if stage is not None:
                stage.apply(self.model, self.config.get("model_type", "this model"))
            self.banks = install_streamed_banks(self.model, self.cache, self.store.quantization,
                                                self.store.moe_layers,
                                                prefetch=prefetch,
                                                guess_top=s.prefetch_top)
            if cast:
                # As a user of mlx-lm would: cast the whole model; "auto" on a GPU keeps the
                # checkpoint's own dtypes, exactly as mlx_lm.load leaves them.
                self.model.set_dtype(self.compute_dtype)
            params = self.model.parameters()
            mx.eval(params)
            self.dense_bytes = sum(v.nbytes for _, v in tree_flatten(params))
            try:
                self.tokenizer = load_tokenizer(self.store.dense_dir,
                                                eos_token_ids=self.config.get("eos_token_id"))
            except Exception as e:  # the tokenizers library raises bare Exceptions on bad files
                raise CheckpointError(f"{self.store.dense_dir}: cannot load the tokenizer "
                                      f"({type(e).__name__}: {str(e)[:200]})") from e
            self.prefix_cache = PrefixCache(s.prefix_cache_entries,
                                            parse_size(s.prefix_cache_bytes)) \
                if s.prefix_cache_entries > 0 and stage is None else None
            self.kv_ledger = KvLedger(bp.kv, bp.kv_bytes, self.prefix_cache)
        except BaseException:
            self._shutdown_io()
            raise

    # -- requests ---------------------------------------------------------------------------
    def validate(self, req: GenRequest) -> None:
        """Raise ``ValueError`` (a ``RequestError``) with a clear message for a request that
        cannot be served; tokenizes its prompt (once: see ``prepare``)."""
        self.prepare(req)

    def prepare(self, req: GenRequest) -> list[int]:
        """Check ``req`` and return its prompt's token ids, tokenized the first time only (kept
        in ``req.tokens``). A prompt too long in bytes to fit ``max_prompt_tokens`` whatever
        its tokens is refused before it is tokenized."""
        if req.tokens is not None:
            return req.tokens
        s = self.settings
        req.check(s.max_tokens_limit)
        limit = s.max_prompt_tokens
        if prompt_bytes(req) > limit * self.max_token_bytes:
            raise RequestError(f"prompt longer than {limit} tokens", "prompt")
        if isinstance(req.prompt, list):
            vocab = self.vocab_size
            if not all(t < vocab for t in req.prompt):
                raise RequestError(f"prompt token ids must be in 0..{vocab - 1}", "prompt")
        try:
            ids = self.encode(req)
        except RequestError:
            raise
        except Exception as e:  # a chat template or tokenizer refusing odd input
            raise RequestError(f"cannot read the request: {type(e).__name__}: {e}") from None
        if not ids:
            raise RequestError("the prompt is empty", "prompt")
        if len(ids) > limit:
            raise RequestError(f"prompt longer than {limit} tokens", "prompt")
        check_request(len(ids), req.max_tokens, self.max_context)
        req.tokens = ids
        return ids

    @functools.cached_property
    def vocab_size(self) -> int:
        tok = self.tokenizer
        return len(tok.vocab) if hasattr(tok, "vocab") else 1 << 31

    @functools.cached_property
    def max_token_bytes(self) -> int:
        """The most bytes any one token's text takes (an upper bound on the bytes per token:
        byte-level and sentencepiece vocabularies spell each byte with one or more)."""
        vocab = getattr(self.tokenizer, "vocab", None)
        if not vocab:
            return 1 << 20
        return max(len(str(k).encode()) for k in vocab)

    def encode(self, req: GenRequest) -> list[int]:
        """Token ids of the prompt: a string exactly as ``mlx_lm.generate`` encodes it, or the
        chat template applied to ``messages``."""
        tok = self.tokenizer
        if req.messages is not None:
            kw = {"tools": req.tools} if req.tools else {}
            ids = tok.apply_chat_template(req.messages, add_generation_prompt=True,
                                          tokenize=True, **kw)
            if isinstance(ids, dict):
                ids = ids["input_ids"]
            return list(ids)
        prompt = req.prompt
        if isinstance(prompt, list):
            return [int(t) for t in prompt]
        add_special = tok.bos_token is None or not prompt.startswith(tok.bos_token)
        return list(tok.encode(prompt, add_special_tokens=add_special))

    def generate(self, req: GenRequest) -> Iterator[Chunk]:
        """Generate for one request in the caller's thread, one chunk per token."""
        if self._closed:
            raise FlashMoeError("engine is closed")
        prompt = self.prepare(req)
        model, sampler = self.model, sampler_for(req)
        lead = self.stage.lead(self, prompt, req.max_tokens, sampler) if self.stage else None
        if lead is not None:
            model, sampler = lead.model, lead.sampler
        stop = StopText(req.stop)
        detok = self.tokenizer.detokenizer
        eos = set(self.tokenizer.eos_token_ids)
        snap = self.snapshot()
        t0 = time.perf_counter()
        t_first = None
        ids: list[int] = []
        finish = "length"
        try:
            for token, logprobs in generate_step(mx.array(prompt), model,
                                                 max_tokens=req.max_tokens, sampler=sampler,
                                                 **kv_args(self.settings.kv_bits, self.config)):
                if t_first is None:
                    t_first = time.perf_counter()
                check_finite(logprobs, token, len(ids))
                if req.id in self._cancelled:
                    finish = "cancelled"
                    break
                if token in eos:
                    finish = "stop"
                    break
                ids.append(token)
                detok.add_token(token)
                text, hit = stop.feed(detok.last_segment)
                lps = [token_logprobs(logprobs, token, req.top_logprobs)] if req.logprobs \
                    else None
                yield Chunk(req.id, text, [token], logprobs=lps)
                if hit:
                    finish = "stop_string"
                    break
        finally:
            self.cache.lane.idle()  # the last layers' pins and guesses, once they have run
            if lead is not None:
                lead.end(sys.exc_info()[1])
        detok.finalize()
        tail, hit = stop.feed(detok.last_segment) if finish != "stop_string" else ("", True)
        finish = "stop" if hit else finish
        t_end = time.perf_counter()
        stats = self.request_stats(snap, len(prompt), len(ids), t0, t_first or t_end, t_end)
        if lead is not None:
            stats["ranks"] = lead.ranks
        self._cancelled.discard(req.id)
        yield Chunk(req.id, tail + ("" if hit else stop.flush()), [], finish_reason=finish,
                    stats=stats, stop_sequence=stop.matched)

    def snapshot(self) -> tuple:
        st = self.cache.stats
        return st.hits, st.misses, st.bytes_read, st.io_wait_s, st.copy_s

    def request_stats(self, snap: tuple, n_prompt: int, n_gen: int, t0: float, t_first: float,
                      t_end: float) -> dict:
        """The stats of one request, from a ``snapshot()`` taken when it started."""
        st = self.cache.stats
        hits, misses = st.hits - snap[0], st.misses - snap[1]
        decode_s = t_end - t_first
        stats = {
            "prompt_tokens": n_prompt,
            "generation_tokens": n_gen,
            "prefill_tokens_per_s": n_prompt / max(t_first - t0, 1e-9),
            "decode_tokens_per_s": (n_gen - 1) / decode_s if n_gen > 1 and decode_s > 0 else 0.0,
            "time_to_first_token_s": t_first - t0,
            "expert_hit_rate": hits / (hits + misses) if hits + misses else 1.0,
            "expert_hits": hits,
            "expert_misses": misses,
            "bytes_read": st.bytes_read - snap[2],
            "io_wait_s": st.io_wait_s - snap[3],
            "copy_s": st.copy_s - snap[4],
            "pool_bytes": self.plan.nbytes,
            "cache_slots": self.plan.cache_slots,
            "staging_slots": self.plan.staging_slots,
            "dense_bytes": self.dense_bytes,
            "max_context": self.max_context,
            "peak_rss_bytes": _peak_rss(),
            "zero_copy": False,
            "dtype": str(self.compute_dtype).split(".")[-1],
        }
        self.requests_served += 1
        self.tokens_generated += n_gen
        self._last_tps = stats["decode_tokens_per_s"] or self._last_tps
        return stats

    # -- engine thread (daemon) -----------------------------------------------------------------
    def start(self) -> None:
        """Start the engine thread; every MLX call happens there from now on."""
        if self.settings.kv_bits:
            raise FlashMoeError("kv_bits works with `flashmoe run` only for now: batched decoding "
                                "(the daemon, bench decode) keeps a full-precision KV cache")
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="flashmoe-engine",
                                            daemon=True)
            self._thread.start()

    def submit(self, req: GenRequest, on_chunk: Callable[[Chunk], None]) -> None:
        """Queue a request; ``on_chunk`` is called from the engine thread for every chunk."""
        if self._closed:
            raise FlashMoeError("engine is closed")
        self._queue.put((req, on_chunk))

    def cancel(self, req_id: str) -> None:
        self._cancelled.add(req_id)

    def _loop(self) -> None:
        if self.stage is not None:
            self.stage.serve_queue(self, self._queue, self._cancelled)
        elif self.lanes > 1:
            Lanes(self, self.lanes, max_batch=self.max_batch).run(self._queue, self._cancelled)
        else:
            Scheduler(self, max_batch=self.max_batch).run(self._queue, self._cancelled)

    def status(self) -> dict:
        st = self.cache.stats
        ready = self.cache.table.stats()["ready"]
        return {
            "model": self.model_name,
            "model_path": str(self.model_path),
            "store_kind": self.store.kind,
            "uptime_s": time.time() - self.started,
            "dtype": str(self.compute_dtype).split(".")[-1],
            "pool_bytes": self.plan.nbytes,
            "budget_bytes": self.budget,
            "max_context": self.max_context,
            "kv_bytes": self.budget_plan.kv_bytes,
            "kv_bytes_in_flight": self.kv_ledger.held(),
            "cache_slots": self.plan.cache_slots,
            "cache_slots_ready": ready,
            "lanes": self.lanes,
            "pool_bytes_used": ready * self.plan.cache_record_bytes
            + self.plan.staging_slots * self.plan.staging_slot_bytes,
            "expert_hit_rate": st.hit_rate(),
            "bytes_read": st.bytes_read,
            "decode_tokens_per_s": self._last_tps,
            "requests_served": self.requests_served,
            "tokens_generated": self.tokens_generated,
            "queued": self._queue.qsize(),
            "workers": self.loader.workers_info(),
            "dense_bytes": self.dense_bytes,
            **(self.prefix_cache.stats() if self.prefix_cache is not None else {}),
            **({"ranks": self.stage.ranks} if self.stage is not None else {}),
        }

    def close(self) -> None:
        """Stop the engine thread, the loader workers, and unlink the shared memory."""
        if self._closed:
            return
        self._closed = True
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=60)
        if self.stage is not None:
            self.stage.shutdown()
        self._shutdown_io()

    def _shutdown_io(self) -> None:
        loader = getattr(self, "loader", None)
        if loader is not None:
            loader.close()
        copier = getattr(getattr(self, "cache", None), "copier", None)
        if copier is not None:
            copier.close()  # unpin the pool's memory before it is unmapped
        self.pool.close()
        self.pool.unlink()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _peak_rss() -> int:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb if sys.platform == "darwin" else kb * 1024


