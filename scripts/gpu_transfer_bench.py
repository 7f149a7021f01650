"""Host shared memory -> MLX expert cache: measure every transfer path MLX allows.

The coordinator keeps, per expert tensor, one MLX array of shape [nslots, *tensor_shape] (the
expert cache) and computes routed experts with ``mx.gather_qmm`` on slot ids. A loader worker puts
each missing expert record into a POSIX shared-memory slot; this script measures the ways to get
N such records (N = 1..64) into N slots of the cache arrays, end to end including the MLX eval,
checks every byte that lands, and times the expert MLP (gate/up/down ``gather_qmm``) on the result.

Paths (names as in the JSON output):

* ``a_per_record``   per record and tensor: ``mx.array(shm_view)``, then ``cache[slot] = arr``
* ``a_nodonate``     the same while a view of the cache is alive (the cache cannot be donated)
* ``b_batched``      per tensor: ``np.stack`` of the N records on the host, one ``mx.array``,
                     one scatter ``cache[slot_ids] = batch``
* ``b2_slab``        one ``mx.array`` of the N records' contiguous shm bytes, GPU-side views per
                     tensor, one scatter per tensor
* ``c_numpy_view``   write through writable numpy views of the cache arrays
* ``d_no_cache``     no cache: per call ``mx.array`` of the N records and ``gather_qmm`` on those
* ``d2_no_cache_slab`` the same from one slab ``mx.array``
* ``e1_mx_load``     ``mx.load`` of a safetensors file in RAM-backed tmpfs, then scatter
* ``e2_cupy_memcpy`` ``cudaMemcpyAsync`` (CuPy) from page-locked shm into the cache's memory
* ``e3_pinned_slab`` ``b2_slab`` with the host bytes in CuPy page-locked memory

Runs anywhere MLX runs; ``--small`` shrinks the shapes so it finishes in seconds on a CPU.
Each row reports ``bytes_ok`` (the slots read back through MLX equal the shm bytes) and ``relerr``
of the expert MLP against a float32 reference built from the dequantized host bytes.

Seen with MLX 0.32.4 on CUDA: ``gather_qmm`` with more than one expert per row returns wrong
values for slots whose weights lie past 2 GiB into the weight array (the 8 GiB cache rows fail
on relerr while their bytes are right); keep each cache array under 2 GiB there.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from multiprocessing import shared_memory

import mlx.core as mx
import numpy as np

SLOT_ALIGN = 16384
TENSOR_ALIGN = 4096
POISON_U32 = 0xDEADBEEF
POISON_BF16 = -7.0
# gather_qmm in bf16 against a float32 reference from the same bytes: ~5e-3 seen on CUDA
RELERR_TOL = 2e-2


@dataclass
class Tensor:
    name: str
    np_dtype: type
    mx_dtype: mx.Dtype
    shape: tuple
    offset: int
    nbytes: int

    @property
    def bf16(self) -> bool:
        return self.mx_dtype == mx.bfloat16

    @property
    def raw_mx_dtype(self) -> mx.Dtype:
        return mx.uint16 if self.bf16 else mx.uint32


def record_layout(hidden: int, inter: int, bits: int, group_size: int):
    """Tensors of one 4-bit expert record (weight uint32, scales/biases bf16) and slot size."""
    tensors = []
    off = 0
    for proj, (out_dim, in_dim) in (
        ("gate", (inter, hidden)),
        ("up", (inter, hidden)),
        ("down", (hidden, inter)),
    ):
        specs = (
            ("weight", np.uint32, mx.uint32, (out_dim, in_dim * bits // 32)),
            ("scales", np.uint16, mx.bfloat16, (out_dim, in_dim // group_size)),
            ("biases", np.uint16, mx.bfloat16, (out_dim, in_dim // group_size)),
        )
        for kind, npd, mxd, shape in specs:
            nbytes = int(np.prod(shape)) * np.dtype(npd).itemsize
            tensors.append(Tensor(f"{proj}.{kind}", npd, mxd, shape, off, nbytes))
            off += -(-nbytes // TENSOR_ALIGN) * TENSOR_ALIGN
    slot_bytes = -(-off // SLOT_ALIGN) * SLOT_ALIGN
    return tensors, slot_bytes


def f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    u = x.astype(np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


class HostPool:
    """A POSIX shared-memory segment of equal slots, one expert record each (the loader's view)."""

    def __init__(self, tensors, slot_bytes: int, nrec: int, seed: int):
        self.tensors = tensors
        self.slot_bytes = slot_bytes
        self.nrec = nrec
        self.shm = shared_memory.SharedMemory(create=True, size=slot_bytes * nrec)
        self.buf = np.ndarray((nrec, slot_bytes), np.uint8, buffer=self.shm.buf)
        rng = np.random.default_rng(seed)
        for r in range(nrec):
            for t in tensors:
                v = self.view(r, t)
                if t.bf16:
                    lo, hi = (0.002, 0.02) if t.name.endswith("scales") else (-0.05, 0.05)
                    v[...] = f32_to_bf16_bits(rng.uniform(lo, hi, size=t.shape))
                else:
                    v[...] = rng.integers(0, 2**32, size=t.shape, dtype=np.uint32)

    def view(self, r: int, t: Tensor) -> np.ndarray:
        return np.ndarray(
            t.shape, t.np_dtype, buffer=self.shm.buf, offset=r * self.slot_bytes + t.offset
        )

    def slab(self, r0: int, n: int) -> np.ndarray:
        return self.buf[r0 : r0 + n]

    def close(self):
        self.buf = None
        try:
            self.shm.close()
        except BufferError:
            pass
        self.shm.unlink()


def sync():
    mx.synchronize()


def make_cache(tensors, nslots: int) -> dict:
    cache = {}
    for t in tensors:
        fill = POISON_BF16 if t.bf16 else POISON_U32
        cache[t.name] = mx.full((nslots, *t.shape), fill, dtype=t.mx_dtype)
    mx.eval(list(cache.values()))
    sync()
    return cache


def as_mx(v: np.ndarray, t: Tensor) -> mx.array:
    a = mx.array(v)
    return a.view(mx.bfloat16) if t.bf16 else a


def slab_parts(slab: mx.array, tensors, n: int) -> dict:
    """GPU-side views of one [n, slot_bytes] uint8 array as the record's tensors."""
    out = {}
    for t in tensors:
        part = slab[:, t.offset : t.offset + t.nbytes]
        out[t.name] = part.view(t.mx_dtype).reshape(n, *t.shape)
    return out


class Bench:
    def __init__(self, args):
        self.args = args
        self.small = args.small
        if args.small:
            self.hidden, self.inter = 256, 128
        else:
            self.hidden, self.inter = args.hidden, args.inter
        self.bits, self.gs = 4, 64
        self.tensors, self.slot_bytes = record_layout(self.hidden, self.inter, self.bits, self.gs)
        self.payload = sum(t.nbytes for t in self.tensors)
        self.nrec = max(args.ns)
        self.pool = HostPool(self.tensors, self.slot_bytes, self.nrec, args.seed)
        self.rng = np.random.default_rng(args.seed + 1)
        self.results = []
        self.errors = {}
        self.refs = {}
        self.t_start = time.perf_counter()
        self.tmpdir = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
        self.shared_cache = None
        self.holds = None
        self.extra_info = {}

    # --- helpers -------------------------------------------------------------------------
    def out_of_time(self) -> bool:
        return time.perf_counter() - self.t_start > self.args.budget_s

    def nslots_for(self, gib: float) -> int:
        return max(self.nrec * 2, int(gib * 2**30 // self.payload))

    def pick(self, n: int, nslots: int):
        r0 = int(self.rng.integers(0, self.nrec - n + 1))
        slots = self.rng.choice(nslots, size=n, replace=False).astype(np.int64)
        return r0, slots

    def routing(self, n: int):
        k = min(n, 8)
        b = -(-n // k)
        order = np.arange(b * k) % n
        return b, k, order

    def x_for(self, n: int) -> mx.array:
        b, _, _ = self.routing(n)
        key = ("x", n)
        if key not in self.refs:
            rng = np.random.default_rng(1000 + n)
            x = rng.standard_normal((b, 1, 1, self.hidden)).astype(np.float32)
            self.refs[key] = mx.array(x).astype(mx.bfloat16)
        return self.refs[key]

    def experts(self, ws: dict, idx: mx.array, x: mx.array, stream=None) -> mx.array:
        kw = dict(transpose=True, group_size=self.gs, bits=self.bits, stream=stream)

        def qmm(inp, proj):
            return mx.gather_qmm(
                inp,
                ws[f"{proj}.weight"],
                ws[f"{proj}.scales"],
                ws[f"{proj}.biases"],
                rhs_indices=idx,
                **kw,
            )

        g = qmm(x, "gate")
        u = qmm(x, "up")
        h = g * mx.sigmoid(g) * u
        return qmm(h, "down")

    def idx_for(self, slots: np.ndarray) -> mx.array:
        b, k, order = self.routing(len(slots))
        return mx.array(slots[order].reshape(b, k).astype(np.uint32))

    def reference(self, r0: int, n: int) -> np.ndarray:
        """Expert MLP output for records r0..r0+n-1, cached per (r0, n)."""
        key = ("ref", r0, n)
        if key not in self.refs:
            self.refs[key] = self._reference(r0, n)
        return self.refs[key]

    def _reference(self, r0: int, n: int) -> np.ndarray:
        """float32 expert MLP from the dequantized host bytes (no gather_qmm involved)."""
        b, k, order = self.routing(n)
        deq = {}
        for proj in ("gate", "up", "down"):
            parts = []
            for kind in ("weight", "scales", "biases"):
                t = next(t for t in self.tensors if t.name == f"{proj}.{kind}")
                parts.append(as_mx(np.stack([self.pool.view(r0 + i, t) for i in range(n)]), t))
            w = mx.dequantize(*parts, group_size=self.gs, bits=self.bits)
            deq[proj] = w.astype(mx.float32)[mx.array(order.reshape(b, k))]  # [b, k, out, in]
        x = self.x_for(n).astype(mx.float32).reshape(b, 1, -1, 1)
        g = (deq["gate"] @ x)[..., 0]
        u = (deq["up"] @ x)[..., 0]
        h = (g * mx.sigmoid(g) * u)[..., None]
        out = (deq["down"] @ h)[..., 0].reshape(b, k, 1, -1)
        mx.eval(out)
        return np.array(out)

    def check_out(self, out: mx.array, r0: int, n: int) -> float:
        ref = self.reference(r0, n)
        got = np.array(out.astype(mx.float32))
        if not np.all(np.isfinite(got)):
            return float("inf")
        return float(np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-30))

    def check_bytes(self, cache: dict, r0: int, slots: np.ndarray) -> bool:
        idx = mx.array(slots.astype(np.uint32))
        for t in self.tensors:
            got = np.array(cache[t.name][idx].view(t.raw_mx_dtype))
            want = np.stack([self.pool.view(r0 + i, t) for i in range(len(slots))])
            if not np.array_equal(got, want):
                return False
        return True

    def record(
        self, path: str, n: int, cache_gib, times: dict, bytes_ok, relerr, extra=None
    ) -> None:
        ok = bytes_ok is not False and relerr is not None and relerr < self.args.tol
        row = {"path": path, "n": n, "cache_gib": cache_gib, "ok": ok, "bytes_ok": bytes_ok}
        row["relerr"] = relerr
        mb = n * self.payload / 1e6
        row["mbytes"] = mb
        for key, vals in times.items():
            if not vals:
                continue
            med = statistics.median(vals)
            row[f"{key}_ms"] = med * 1e3
            row[f"{key}_ms_min"] = min(vals) * 1e3
            if key in ("xfer", "e2e"):
                row[f"{key}_gbps"] = mb / 1e3 / med if med > 0 else None
        if extra:
            row.update(extra)
        self.results.append(row)
        parts = [f"{path:18s} N={n:3d} cache={cache_gib!s:>4} bytes={bytes_ok!s:5s}"]
        for key in ("xfer", "e2e", "compute"):
            if f"{key}_ms" in row:
                parts.append(f"{key}={row[f'{key}_ms']:8.3f}ms")
                if f"{key}_gbps" in row:
                    parts.append(f"({row[f'{key}_gbps']:6.2f} GB/s)")
        if relerr is not None:
            parts.append(f"relerr={relerr:.2e}")
        print(" ".join(parts), flush=True)

    # --- the cache paths -------------------------------------------------------------------
    def run_cache_path(self, path: str, cache: dict, n: int, gib, xfer):
        """Time xfer (transfer + eval), e2e (transfer + experts + eval), compute (hit case)."""
        nslots = next(iter(cache.values())).shape[0]
        reps = self.args.reps if n <= 8 else max(3, self.args.reps // 2)
        times = {"xfer": [], "e2e": [], "compute": []}
        bytes_ok = True
        relerr = None
        for it in range(reps + self.args.warmup):
            r0, slots = self.pick(n, nslots)
            sync()
            t0 = time.perf_counter()
            xfer(cache, r0, slots)
            mx.eval(list(cache.values()))
            sync()
            t1 = time.perf_counter()
            x = self.x_for(n)
            idx = self.idx_for(slots)
            mx.eval(x, idx)
            t2 = time.perf_counter()
            out = self.experts(cache, idx, x)
            mx.eval(out)
            sync()
            t3 = time.perf_counter()
            check = it == 0 or it == reps + self.args.warmup - 1
            if check:  # before the e2e transfer below may reuse one of these slots
                bytes_ok = bytes_ok and self.check_bytes(cache, r0, slots)
            # e2e: fresh mapping, transfer and compute in one graph and one eval
            r0b, slotsb = self.pick(n, nslots)
            idxb = self.idx_for(slotsb)
            mx.eval(idxb)
            sync()
            t4 = time.perf_counter()
            xfer(cache, r0b, slotsb)
            outb = self.experts(cache, idxb, x)
            mx.eval(outb)
            sync()
            t5 = time.perf_counter()
            if it >= self.args.warmup:
                times["xfer"].append(t1 - t0)
                times["compute"].append(t3 - t2)
                times["e2e"].append(t5 - t4)
            if check:
                bytes_ok = bytes_ok and self.check_bytes(cache, r0b, slotsb)
                e = self.check_out(outb, r0b, n)
                relerr = e if relerr is None else max(relerr, e)
        self.record(path, n, gib, times, bytes_ok, relerr)

    def xfer_per_record(self, cache, r0, slots):
        for i, s in enumerate(slots):
            for t in self.tensors:
                cache[t.name][int(s)] = as_mx(self.pool.view(r0 + i, t), t)

    def xfer_batched(self, cache, r0, slots):
        idx = mx.array(slots.astype(np.uint32))
        n = len(slots)
        for t in self.tensors:
            host = np.stack([self.pool.view(r0 + i, t) for i in range(n)])
            cache[t.name][idx] = as_mx(host, t)

    def xfer_slab(self, cache, r0, slots, slab_src=None):
        n = len(slots)
        idx = mx.array(slots.astype(np.uint32))
        src = self.pool.slab(r0, n) if slab_src is None else slab_src(r0, n)
        parts = slab_parts(mx.array(src), self.tensors, n)
        for t in self.tensors:
            cache[t.name][idx] = parts[t.name]

    # --- sections ----------------------------------------------------------------------------
    def section(self, name, fn):
        if self.out_of_time():
            self.errors[name] = "skipped: time budget spent"
            print(f"[skip] {name}: time budget spent", flush=True)
            return
        print(f"--- {name}", flush=True)
        t0 = time.perf_counter()
        try:
            fn()
        except Exception as exc:  # keep going: one failed path must not hide the others
            self.errors[name] = f"{type(exc).__name__}: {exc}"
            print(f"[error] {name}: {type(exc).__name__}: {exc}", flush=True)
            traceback.print_exc(limit=3)
        finally:
            gc.collect()
            mx.clear_cache()
        print(f"    ({time.perf_counter() - t0:.1f} s)", flush=True)

    def sec_cache_paths(self):
        sizes = [0.0625] if self.small else self.args.cache_gib
        for gib in sizes:
            if self.out_of_time():
                self.errors[f"cache_paths_{gib}"] = "skipped: time budget spent"
                continue
            cache = make_cache(self.tensors, self.nslots_for(gib))
            for n in self.args.ns:
                self.run_cache_path("a_per_record", cache, n, gib, self.xfer_per_record)
                self.run_cache_path("b_batched", cache, n, gib, self.xfer_batched)
                self.run_cache_path("b2_slab", cache, n, gib, self.xfer_slab)
            del cache
            gc.collect()
            mx.clear_cache()

    def sec_nodonate(self):
        gib = 0.0625 if self.small else self.args.main_gib
        cache = make_cache(self.tensors, self.nslots_for(gib))

        def holding(inner):
            # a view of each cache array stays alive across the update, as a pending or
            # kept result that references the cache would: the update cannot reuse the buffer
            def xfer(cache_, r0, slots):
                self.holds = [v.reshape(-1) for v in cache_.values()]
                mx.eval(self.holds)
                inner(cache_, r0, slots)

            return xfer

        for n in (8,):
            self.run_cache_path("a_nodonate", cache, n, gib, holding(self.xfer_per_record))
            self.run_cache_path("b2_nodonate", cache, n, gib, holding(self.xfer_slab))
        self.holds = None

    def sec_numpy_view(self):
        gib = 0.0625 if self.small else self.args.main_gib
        cache = make_cache(self.tensors, self.nslots_for(gib))
        out = self.experts(cache, self.idx_for(np.arange(8)), self.x_for(8))
        mx.eval(out)  # a GPU op has touched the cache before the views exist
        sync()
        t0 = time.perf_counter()
        raw = {t.name: cache[t.name].view(t.raw_mx_dtype) for t in self.tensors}
        views = {k: np.array(v, copy=False) for k, v in raw.items()}
        t_view = time.perf_counter() - t0
        writable = all(v.flags.writeable for v in views.values())
        print(f"    numpy views: {t_view * 1e3:.1f} ms, writable={writable}", flush=True)
        self.extra_info["numpy_view_create_ms"] = t_view * 1e3
        self.extra_info["numpy_view_writable"] = writable
        if not writable:
            raise RuntimeError("numpy view of an MLX array is read-only here")

        def xfer(cache_, r0, slots):
            for i, s in enumerate(slots):
                for t in self.tensors:
                    views[t.name][int(s)] = self.pool.view(r0 + i, t)

        # the compute-after-host-write cost (page migration back to the GPU) shows in e2e
        for n in self.args.ns:
            self.run_cache_path("c_numpy_view", cache, n, gib, xfer)
        self.shared_cache = (cache, raw, views)

    def sec_cupy_memcpy(self):
        try:
            import cupy as cp
        except ImportError as exc:
            raise RuntimeError("cupy not importable") from exc
        if self.shared_cache is None:
            raise RuntimeError("needs the numpy-view section's cache (its device pointers)")
        cache, raw, views = self.shared_cache
        gib = 0.0625 if self.small else self.args.main_gib
        shm_ptr = self.pool.buf.ctypes.data
        size = self.pool.buf.nbytes
        registered = False
        try:
            cp.cuda.runtime.hostRegister(shm_ptr, size, 0)
            registered = True
        except Exception as exc:
            print(f"    hostRegister failed: {exc}", flush=True)
        self.extra_info["shm_host_registered"] = registered
        stream = cp.cuda.Stream(non_blocking=True)
        ptrs = {k: v.ctypes.data for k, v in views.items()}
        strides = {t.name: t.nbytes for t in self.tensors}
        prefetch = "not tried"
        try:
            loc_dev = cp.cuda.runtime.getDevice()
            for k, v in views.items():
                cp.cuda.runtime.memPrefetchAsync(ptrs[k], v.nbytes, loc_dev, stream.ptr)
            stream.synchronize()
            prefetch = "ok"
        except Exception as exc:
            prefetch = f"{type(exc).__name__}: {exc}"
        self.extra_info["managed_prefetch_to_gpu"] = prefetch

        def xfer(cache_, r0, slots):
            for i, s in enumerate(slots):
                base = shm_ptr + (r0 + i) * self.pool.slot_bytes
                for t in self.tensors:
                    cp.cuda.runtime.memcpyAsync(
                        ptrs[t.name] + int(s) * strides[t.name],
                        base + t.offset,
                        t.nbytes,
                        cp.cuda.runtime.memcpyDefault,
                        stream.ptr,
                    )
            stream.synchronize()

        for n in self.args.ns:
            self.run_cache_path("e2_cupy_memcpy", cache, n, gib, xfer)
        if registered:
            cp.cuda.runtime.hostUnregister(shm_ptr)

    def sec_pinned_slab(self):
        try:
            import cupyx
        except ImportError as exc:
            raise RuntimeError("cupy not importable") from exc
        gib = 0.0625 if self.small else self.args.main_gib
        pinned = cupyx.empty_pinned(self.pool.buf.shape, np.uint8)
        pinned[...] = self.pool.buf
        cache = make_cache(self.tensors, self.nslots_for(gib))
        for n in self.args.ns:
            self.run_cache_path(
                "e3_pinned_slab",
                cache,
                n,
                gib,
                lambda c, r0, s: self.xfer_slab(c, r0, s, lambda a, b: pinned[a : a + b]),
            )

    def sec_mx_load(self):
        gib = 0.0625 if self.small else self.args.main_gib
        path = os.path.join(self.tmpdir, f"fmbench_{os.getpid()}.safetensors")
        arrays = {}
        for r in range(self.nrec):
            for t in self.tensors:
                arrays[f"r{r}.{t.name}"] = mx.array(self.pool.view(r, t))
        mx.save_safetensors(path, arrays)
        del arrays
        cache = make_cache(self.tensors, self.nslots_for(gib))

        def xfer(cache_, r0, slots):
            loaded = mx.load(path)
            idx = mx.array(slots.astype(np.uint32))
            n = len(slots)
            for t in self.tensors:
                parts = [loaded[f"r{r0 + i}.{t.name}"] for i in range(n)]
                batch = mx.stack(parts)
                cache_[t.name][idx] = batch.view(mx.bfloat16) if t.bf16 else batch

        try:
            for n in self.args.ns:
                self.run_cache_path("e1_mx_load", cache, n, gib, xfer)
        finally:
            os.unlink(path)

    def sec_no_cache(self):
        for n in self.args.ns:
            for name, slab in (("d_no_cache", False), ("d2_no_cache_slab", True)):
                reps = self.args.reps if n <= 8 else max(3, self.args.reps // 2)
                times = {"e2e": [], "xfer": []}
                relerr = None
                b, k, order = self.routing(n)
                idx = mx.array(order.reshape(b, k).astype(np.uint32))
                x = self.x_for(n)
                mx.eval(idx, x)
                for it in range(reps + self.args.warmup):
                    r0 = int(self.rng.integers(0, self.nrec - n + 1))
                    for phase in ("xfer", "e2e"):
                        sync()
                        t0 = time.perf_counter()
                        if slab:
                            ws = slab_parts(mx.array(self.pool.slab(r0, n)), self.tensors, n)
                        else:
                            ws = {}
                            for t in self.tensors:
                                host = np.stack([self.pool.view(r0 + i, t) for i in range(n)])
                                ws[t.name] = as_mx(host, t)
                        if phase == "xfer":
                            mx.eval(list(ws.values()))
                        else:
                            out = self.experts(ws, idx, x)
                            mx.eval(out)
                        sync()
                        if it >= self.args.warmup:
                            times[phase].append(time.perf_counter() - t0)
                    if it == 0:
                        relerr = self.check_out(out, r0, n)
                self.record(name, n, None, times, None, relerr)

    def sec_interop(self):
        """What DLPack and buffer interop MLX allows on this backend (outcomes as text)."""
        info = {}
        a = mx.arange(16, dtype=mx.float32) + 1
        mx.eval(a)

        def attempt(key, fn):
            try:
                res = fn()
                info[key] = f"ok: {res}"
            except Exception as exc:
                info[key] = f"{type(exc).__name__}: {str(exc)[:200]}"

        attempt("mx.__dlpack_device__", lambda: a.__dlpack_device__())
        attempt("np.from_dlpack(mx)", lambda: np.from_dlpack(a)[:3])
        try:
            import cupy as cp

            c = cp.arange(16, dtype=cp.float32)
            attempt("mx.from_dlpack(cupy)", lambda: mx.from_dlpack(c).shape)
            attempt("mx.from_dlpack(cupy, copy=True)", lambda: mx.from_dlpack(c, copy=True).shape)
            attempt("cupy.from_dlpack(mx)", lambda: cp.from_dlpack(a).device)
            attr = cp.cuda.runtime.deviceGetAttribute
            for nm, code in (
                ("concurrentManagedAccess", 89),
                ("pageableMemoryAccess", 88),
                ("managedMemory", 83),
                ("directManagedMemAccessFromHost", 101),
                ("hostRegisterSupported", 104),
            ):
                attempt(f"attr.{nm}", lambda code=code: attr(code, 0))
        except ImportError:
            info["cupy"] = "not importable"
        try:
            import torch

            if torch.cuda.is_available():
                tt = torch.arange(16, dtype=torch.float32, device="cuda")
                attempt("mx.from_dlpack(torch.cuda)", lambda: mx.from_dlpack(tt).shape)
                attempt("torch.from_dlpack(mx)", lambda: torch.from_dlpack(a).device)
        except ImportError:
            info["torch"] = "not importable"
        for k, v in info.items():
            print(f"    {k}: {v}", flush=True)
        self.extra_info["interop"] = info

    def sec_raw_ceilings(self):
        """Plain CUDA copies of 64 MiB through CuPy: what the link gives without MLX."""
        import cupy as cp
        import cupyx

        n = 8 << 20 if self.small else 64 << 20
        dev = cp.empty(n, cp.uint8)
        pinned = cupyx.empty_pinned((n,), np.uint8)
        pinned[...] = 1
        pageable = np.ones(n, np.uint8)
        res = {}
        for name, ptr in (
            ("pinned_h2d", pinned.ctypes.data),
            ("pageable_h2d", pageable.ctypes.data),
        ):
            vals = []
            for it in range(6):
                cp.cuda.Device().synchronize()
                t0 = time.perf_counter()
                cp.cuda.runtime.memcpy(dev.data.ptr, ptr, n, cp.cuda.runtime.memcpyHostToDevice)
                cp.cuda.Device().synchronize()
                if it:
                    vals.append(time.perf_counter() - t0)
            res[name + "_gbps"] = n / 1e9 / statistics.median(vals)
        vals = []
        for it in range(6):
            t0 = time.perf_counter()
            np.copyto(pageable, pinned)
            if it:
                vals.append(time.perf_counter() - t0)
        res["host_memcpy_gbps"] = n / 1e9 / statistics.median(vals)
        for k, v in res.items():
            print(f"    {k}: {v:.2f}", flush=True)
        self.extra_info["raw"] = res

    def run(self):
        info = {
            "python": sys.version.split()[0],
            "mlx": mx.__version__,
            "platform": platform.platform(),
            "default_device": str(mx.default_device()),
            "cuda_available": bool(getattr(mx, "cuda", None) and mx.cuda.is_available()),
            "record_payload_bytes": self.payload,
            "slot_bytes": self.slot_bytes,
            "shape": {"hidden": self.hidden, "inter": self.inter, "bits": 4, "group_size": 64},
            "tensors": [(t.name, str(t.mx_dtype), t.shape, t.nbytes) for t in self.tensors],
        }
        print(json.dumps(info), flush=True)
        only = set(self.args.only.split(",")) if self.args.only else None
        sections = [
            ("interop", self.sec_interop),
            ("raw_ceilings", self.sec_raw_ceilings),
            ("no_cache", self.sec_no_cache),
            ("numpy_view", self.sec_numpy_view),
            ("cupy_memcpy", self.sec_cupy_memcpy),
            ("mx_load", self.sec_mx_load),
            ("cache_paths", self.sec_cache_paths),
            ("nodonate", self.sec_nodonate),
            ("pinned_slab", self.sec_pinned_slab),
        ]
        for name, fn in sections:
            if only is None or name in only:
                self.section(name, fn)
                self.dump(info)
        self.summary()
        return info

    def dump(self, info):
        if not self.args.out:
            return
        doc = {
            "info": info,
            "extra": self.extra_info,
            "errors": self.errors,
            "results": self.results,
            "elapsed_s": time.perf_counter() - self.t_start,
        }
        tmp = self.args.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(doc, f, indent=1, default=str)
        os.replace(tmp, self.args.out)

    def summary(self):
        print("\n=== summary (median ms; GB/s of record payload) ===")
        hdr = f"{'path':18s} {'N':>3s} {'GiB':>6s} {'xfer ms':>9s} {'GB/s':>7s} "
        hdr += f"{'e2e ms':>9s} {'GB/s':>7s} {'compute':>8s} bytes relerr ok"
        print(hdr)
        for r in self.results:

            def g(k, fmt, r=r):
                v = r.get(k)
                return format(v, fmt) if isinstance(v, (int, float)) else "-"

            print(
                f"{r['path']:18s} {r['n']:3d} {str(r['cache_gib'] or '-'):>6s} "
                f"{g('xfer_ms', '9.3f')} {g('xfer_gbps', '7.2f')} "
                f"{g('e2e_ms', '9.3f')} {g('e2e_gbps', '7.2f')} {g('compute_ms', '8.3f')} "
                f"{ {True: 'Y', False: 'N'}.get(r['bytes_ok'], '-'):>5s} {g('relerr', '.1e')} "
                f"{'Y' if r['ok'] else 'N'}"
            )
        if self.errors:
            print("errors/skips:")
            for k, v in self.errors.items():
                print(f"  {k}: {v}")
        print(f"elapsed {time.perf_counter() - self.t_start:.1f} s", flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--small", action="store_true", help="tiny shapes, for a CPU smoke run")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--inter", type=int, default=768)
    p.add_argument("--ns", type=lambda s: [int(v) for v in s.split(",")], default=[1, 8, 64])
    p.add_argument(
        "--cache-gib", type=lambda s: [float(v) for v in s.split(",")], default=[0.5, 2.0, 8.0]
    )
    p.add_argument("--main-gib", type=float, default=2.0, help="cache size of the other paths")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tol", type=float, default=RELERR_TOL, help="relative error allowed")
    p.add_argument("--budget-s", type=float, default=400.0, help="skip sections after this")
    p.add_argument("--only", default="", help="comma list of sections to run")
    p.add_argument("--out", default="", help="write the results as JSON here")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    bench = Bench(args)
    try:
        bench.run()
    finally:
        bench.pool.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
