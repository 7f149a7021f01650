"""Staging slot -> cache slot copies on MLX's CUDA backend, through the CUDA runtime (ctypes).

On CUDA, MLX keeps arrays in managed memory. Writing a cache slot through a numpy view of it
migrates pages between host and GPU on every miss (1-3 GB/s). Here the shared-memory segment that
the loader workers read into is page-locked once (``cudaHostRegister``) and every miss is one
``cudaMemcpyAsync`` per record tensor, straight from the staging slot into the cache array's
memory, on one stream (tens of GB/s). ``fill`` only queues the copies, so a record's copy runs
while the next record is still being read; ``sync`` waits for all of them, once per bank call.
Of every host-to-cache path MLX allows on CUDA (``mx.array`` of the shared memory then a scatter,
batched or per record, writes through numpy views, ``mx.load`` from tmpfs, no cache at all), this
one moved a record fastest, with every byte checked.

Only raw byte copies: used when every record tensor is cached in its own dtype (4-bit weights as
uint32, bf16 scales with a bf16 compute dtype); otherwise ``make_copier`` returns None and the
cache keeps its numpy path, which converts.

Safe because of the cache's rule: a slot is handed out for a new record only after the host has
synchronised on a routing that depends on every kernel that read its old content, so a copy is
queued after those kernels have run; the cache arrays are never written by MLX operations; and
the cache calls ``sync`` before any computation may read a filled slot and before a staging slot
is reused.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
import sys

import mlx.core as mx
import numpy as np

from flashmoe.errors import FlashMoeError

# MLX 0.32 on CUDA: gather_qmm with more than one expert per row reads wrong weights for slots
# lying more than 2 GiB into the weight array; every cache array stays below this.
MAX_ARRAY_BYTES = 2**31 - 1

_MEMCPY_DEFAULT = 4  # cudaMemcpyDefault: direction from the pointers (unified addressing)
_STREAM_NON_BLOCKING = 1
_MEM_LOCATION_DEVICE = 1


class _MemLocation(ctypes.Structure):  # cudaMemLocation (CUDA >= 12.2)
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


def on_cuda() -> bool:
    """Whether MLX computes on an NVIDIA GPU (not Metal, not the CPU)."""
    if mx.default_device() != mx.gpu:
        return False
    cuda = getattr(mx, "cuda", None)
    try:
        return bool(cuda is not None and cuda.is_available())
    except Exception:
        return False


def _candidates() -> list[str]:
    out = []
    try:  # the runtime MLX itself loaded, if it is in this process already
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.rsplit(None, 1)[-1]
                if "/libcudart.so" in path and path not in out:
                    out.append(path)
    except OSError:
        pass
    out += ["libcudart.so.13", "libcudart.so.12", "libcudart.so"]
    found = ctypes.util.find_library("cudart")
    if found:
        out.append(found)
    roots = [os.path.join(p, "nvidia") for p in sys.path if p]
    roots += [os.environ.get("CUDA_HOME", ""), "/usr/local/cuda"] + sorted(
        glob.glob("/usr/local/cuda-*"))
    for root in filter(None, roots):
        for pattern in ("cu13/lib/libcudart.so*", "cuda_runtime/lib/libcudart.so*",
                        "lib64/libcudart.so*", "targets/*/lib/libcudart.so*"):
            out += sorted(glob.glob(os.path.join(root, pattern)), reverse=True)
    return out


def load_cudart() -> ctypes.CDLL | None:
    """The CUDA runtime library, or None where there is none."""
    for name in _candidates():
        try:
            lib = ctypes.CDLL(name)
            lib.cudaMemcpyAsync  # noqa: B018  (a library with that name but not the runtime)
        except (OSError, AttributeError):
            continue
        return lib
    return None


class _Runtime:
    """The few CUDA runtime calls we make, each checked."""

    def __init__(self, lib: ctypes.CDLL):
        self.lib = lib
        vp, sz, ui, i = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int
        sig = {
            "cudaGetErrorString": ([i], ctypes.c_char_p),
            "cudaRuntimeGetVersion": ([ctypes.POINTER(i)], i),
            "cudaGetDevice": ([ctypes.POINTER(i)], i),
            "cudaHostRegister": ([vp, sz, ui], i),
            "cudaHostUnregister": ([vp], i),
            "cudaStreamCreateWithFlags": ([ctypes.POINTER(vp), ui], i),
            "cudaStreamDestroy": ([vp], i),
            "cudaStreamSynchronize": ([vp], i),
            "cudaMemcpyAsync": ([vp, vp, sz, i, vp], i),
        }
        for name, (args, res) in sig.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = args, res
        # cudaMemcpyAsync only queues a copy from page-locked memory (microseconds): called
        # through PyDLL it keeps the GIL, so a record's nine or so calls do not each have to
        # win the GIL back from the other threads of the coordinator.
        quick = ctypes.PyDLL(lib._name).cudaMemcpyAsync
        quick.argtypes, quick.restype = sig["cudaMemcpyAsync"]
        self.memcpy_async = quick
        self.stream_sync = lib.cudaStreamSynchronize
        v = ctypes.c_int()
        self.check(lib.cudaRuntimeGetVersion(ctypes.byref(v)), "cudaRuntimeGetVersion")
        self.version = v.value

    def check(self, rc: int, call: str) -> None:
        if rc != 0:
            msg = self.lib.cudaGetErrorString(rc)
            raise FlashMoeError(f"CUDA {call} failed: error {rc} "
                                f"({msg.decode() if msg else 'unknown'})")

    def device(self) -> int:
        d = ctypes.c_int()
        self.check(self.lib.cudaGetDevice(ctypes.byref(d)), "cudaGetDevice")
        return d.value

    def prefetch(self, ptr: int, nbytes: int, device: int, stream: int) -> bool:
        """Move managed memory to ``device``; False where the runtime cannot (plain memory)."""
        fn = self.lib.cudaMemPrefetchAsync
        if self.version >= 13000:  # (ptr, count, cudaMemLocation, flags, stream)
            fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, _MemLocation, ctypes.c_uint,
                           ctypes.c_void_p]
            rc = fn(ptr, nbytes, _MemLocation(_MEM_LOCATION_DEVICE, device), 0, stream)
        else:  # (ptr, count, device, stream)
            fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
            rc = fn(ptr, nbytes, device, stream)
        fn.restype = ctypes.c_int
        if rc != 0:
            self.lib.cudaGetLastError()  # clear it: the copies work without the prefetch
            return False
        return True


class CudaCopier:
    """``fill(slot, stage)``: queue the copy of one record from staging slot ``stage`` of the pool
    into cache slot ``slot``, one ``cudaMemcpyAsync`` per tensor; ``sync()``: wait for every
    queued copy."""

    def __init__(self, rt: _Runtime, cache, pool):
        self.rt = rt
        self._registered = None
        self._stream = ctypes.c_void_p()
        first = pool.slot(0)
        base = first.ctypes.data - pool.offset(0)
        del first
        self._stage_addr = [base + pool.offset(i) for i in range(pool.nslots)]
        self.nslots = cache.nslots
        self.tensors = []  # (cache array address, bytes per slot, offset in record, bytes)
        for t in cache.layout.tensors:
            a = cache.arrays[t.name]
            view = np.array(a.view(mx.uint16) if a.dtype == mx.bfloat16 else a, copy=False)
            per_slot = view.nbytes // max(cache.nslots, 1)
            if per_slot != t.nbytes:
                raise FlashMoeError(f"cache tensor {t.name}: {per_slot} bytes per slot, record "
                                    f"has {t.nbytes}")
            self.tensors.append((view.ctypes.data, per_slot, t.offset, t.nbytes))
            del view
        self.record_bytes = sum(t[3] for t in self.tensors)
        self.nbytes_copied = 0
        try:
            rt.check(rt.lib.cudaStreamCreateWithFlags(ctypes.byref(self._stream),
                                                      _STREAM_NON_BLOCKING),
                     "cudaStreamCreateWithFlags")
            rt.check(rt.lib.cudaHostRegister(base, pool.nbytes, 0), "cudaHostRegister")
            self._registered = base
            # The numpy views that located the cache pulled it to the host: move it back once.
            dev = rt.device()
            self.prefetched = all([rt.prefetch(addr, per * self.nslots, dev, self._stream.value)
                                   for addr, per, _, _ in self.tensors])
            rt.check(rt.stream_sync(self._stream), "cudaStreamSynchronize")
        except BaseException:
            self.close()
            raise

    def fill(self, slot: int, stage: int) -> None:
        if not 0 <= slot < self.nslots:
            raise IndexError(f"cache slot {slot} out of range ({self.nslots})")
        src = self._stage_addr[stage]
        stream = self._stream
        copy = self.rt.memcpy_async
        for addr, per_slot, offset, nbytes in self.tensors:
            rc = copy(addr + slot * per_slot, src + offset, nbytes, _MEMCPY_DEFAULT, stream)
            if rc != 0:
                self.rt.check(rc, "cudaMemcpyAsync")
        self.nbytes_copied += self.record_bytes

    def sync(self) -> None:
        """Wait until every queued copy has landed."""
        self.rt.check(self.rt.stream_sync(self._stream), "cudaStreamSynchronize")

    def close(self) -> None:
        """Unregister the pool's memory and drop the stream (before the pool is unmapped)."""
        if self._stream.value:
            self.rt.lib.cudaStreamSynchronize(self._stream)  # no copy may outlive the pool
        if self._registered is not None:
            self.rt.check(self.rt.lib.cudaHostUnregister(self._registered), "cudaHostUnregister")
            self._registered = None
        if self._stream.value:
            self.rt.lib.cudaStreamDestroy(self._stream)
            self._stream = ctypes.c_void_p()


def raw_copy_ok(cache) -> bool:
    """Whether every record tensor is cached in its own dtype (a byte copy fills the slot)."""
    for t in cache.layout.tensors:
        want = getattr(mx, t.dtype, None)
        if want is None or cache.arrays[t.name].dtype != want:
            return False
    return True


def make_copier(cache, pool) -> CudaCopier | None:
    """A ``CudaCopier`` for ``cache`` fed from ``pool``, or None where it does not apply (not on
    CUDA, no CUDA runtime, or a tensor that needs a dtype conversion on the way)."""
    if not on_cuda() or not raw_copy_ok(cache) or cache.nslots == 0:
        return None
    lib = load_cudart()
    if lib is None:
        return None
    return CudaCopier(_Runtime(lib), cache, pool)
