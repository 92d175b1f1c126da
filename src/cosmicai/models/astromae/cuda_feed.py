"""The CUDA path of the torch engine: the runner (precision per mode) and the feed that keeps the GPU busy.

* :func:`cuda_runner` (called by ``fast.prepare`` for a CUDA device): ``exact`` is fp32 with TF32 switched off
  for matrix products and cuDNN convolutions (``torch.backends.cuda.matmul.allow_tf32`` and
  ``torch.backends.cudnn.allow_tf32`` are set to False, process-wide, when the predictor is built, and again
  before every exact prediction); ``fast`` is autocast in fp16 (default) or bf16 (``CAI_CUDA_FAST_DTYPE``).
  fp16 is the default because bf16's 8-bit mantissa costs too much here: under CPU-emulated autocast (the only
  measurement this project could make without a GPU) max |dz| against exact was 3.3e-3 in bf16 but 3.5e-4 in
  fp16 with the demo weights (1,000 galaxies), and 4.6e-3 / 7.7e-4 with random weights; the guard's
  tolerance is 2e-3, so bf16 would always fall back to exact.
* :class:`DeviceFeed` predicts one partition: rows are copied into **pinned** host staging buffers, sent to the
  device with asynchronous copies on a **side stream**, ordered against the compute stream by events, with
  **two slots**, so the next chunk's copy overlaps the current chunk's forward. Non-finite rows are found on
  the device, zeroed before the forward (the network never sees NaN/inf) and come back NaN. Predictions and
  flags accumulate on the device and come back with **one** synchronisation per call (per partition). Without
  CUDA the same loop runs synchronously on CPU tensors (what the tests exercise).

Knobs:

* ``CAI_CUDA_ROWS`` (or ``Predictor.set_forward_rows``): rows per forward. Default: :func:`auto_rows` from the
  free device memory (``torch.cuda.mem_get_info``): 16,384 on a large GPU. ``batch_size`` stays the unit of the
  per-rank record and of I/O; one forward never spans two partitions.
* ``CAI_CUDA_GRAPHS=1``: capture each padded forward size once as a ``torch.cuda.CUDAGraph`` and replay it
  (launch overhead paid once). Chunks are padded to a multiple of 256 rows, at most ``MAX_GRAPHS`` sizes.
* ``CAI_COMPILE=1`` / ``compile=True`` on CUDA: ``torch.compile(mode="reduce-overhead")`` (its own CUDA graphs);
  chunks are padded to powers of two so few shapes compile. Compiled kernels are cached where torch caches them
  (``TORCHINDUCTOR_CACHE_DIR``, default ``/tmp/torchinductor_$USER``), so later processes skip most of the work.
* ``CAI_CUDA_COPY_THREADS``: threads that fill the pinned buffers (default 4 on CUDA).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ...errors import ModelError

#: Conservative device bytes per row of one forward pass (activations, staging, cuDNN workspace, allocator
#: slack): the largest live activations of AstroMAE are ~0.3 MB per row in fp32 (the 32-channel 32x32 maps of
#: the first Inception layer, the 17x768 MLP hidden states); half-precision activations halve that.
ROW_BYTES = {"exact": 1 << 20, "fast": 1 << 19}
#: Share of the free device memory one forward may plan to use.
MEMORY_FRACTION = 0.5
MIN_ROWS, MAX_ROWS = 256, 16384
#: Row multiple that graph-captured forwards are padded to.
GRAPH_ALIGN = 256
#: At most this many captured sizes per feed (each holds its own memory pool); others run eagerly.
MAX_GRAPHS = 8
FAST_DTYPES = {"fp16": torch.float16, "float16": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
ENV_ROWS, ENV_GRAPHS, ENV_DTYPE, ENV_COPY_THREADS = ("CAI_CUDA_ROWS", "CAI_CUDA_GRAPHS", "CAI_CUDA_FAST_DTYPE",
                                                     "CAI_CUDA_COPY_THREADS")


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


def _env_int(name: str, minimum: int = 1) -> int | None:
    text = os.environ.get(name, "").strip()
    if not text:
        return None
    try:
        value = int(text)
    except ValueError:
        raise ModelError(f"{name}={text!r} is not an integer") from None
    if value < minimum:
        raise ModelError(f"{name}={value} must be >= {minimum}")
    return value


def auto_rows(free_bytes: int, mode: str = "exact", *, fraction: float = MEMORY_FRACTION,
              min_rows: int = MIN_ROWS, max_rows: int = MAX_ROWS) -> int:
    """Rows per forward for ``free_bytes`` of free device memory: the largest power of two whose estimated
    footprint (:data:`ROW_BYTES`) fits in ``fraction`` of it, clamped to [``min_rows``, ``max_rows``]."""
    per = ROW_BYTES.get(mode, ROW_BYTES["exact"])
    fit = int(max(0, free_bytes) * fraction) // per
    rows = 1 << (fit.bit_length() - 1) if fit >= 1 else 1
    return max(min_rows, min(max_rows, rows))


def padded_rows(k: int, rows: int, policy: str) -> int:
    """Rows a chunk of ``k`` rows is padded to: ``none`` -> k; ``align`` -> the next multiple of
    :data:`GRAPH_ALIGN`; ``pow2`` -> the next power of two (at least GRAPH_ALIGN); never more than ``rows``
    (chunks are at most ``rows`` long) unless k itself is."""
    if k < 1:
        raise ValueError(f"chunk of {k} rows")
    if policy == "none":
        return k
    if policy == "align":
        size = math.ceil(k / GRAPH_ALIGN) * GRAPH_ALIGN
    elif policy == "pow2":
        size = max(GRAPH_ALIGN, 1 << (k - 1).bit_length())
    else:
        raise ValueError(f"unknown padding policy {policy!r}")
    return max(k, min(size, rows))


def fast_dtype() -> torch.dtype:
    """The autocast dtype of fast mode on CUDA: ``CAI_CUDA_FAST_DTYPE`` (fp16 default, or bf16)."""
    text = os.environ.get(ENV_DTYPE, "").strip().lower() or "fp16"
    if text not in FAST_DTYPES:
        raise ModelError(f"{ENV_DTYPE}={text!r} is not known; choose fp16 or bf16")
    return FAST_DTYPES[text]


def disable_tf32() -> None:
    """fp32 means fp32: no TF32 in matrix products or cuDNN convolutions (process-wide)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


class CudaRunner:
    """``(images, magnitudes) -> float32 redshift`` on a CUDA device for one mode (see the module docstring)."""

    def __init__(self, model: nn.Module, mode: str, compiled: bool = False, dtype: torch.dtype | None = None):
        self.model, self.mode, self.compiled = model, mode, compiled
        self.dtype = None if mode == "exact" else (dtype or fast_dtype())
        self._fn = torch.compile(model, mode="reduce-overhead", dynamic=False) if compiled else model

    def __call__(self, images: torch.Tensor, magnitudes: torch.Tensor) -> torch.Tensor:
        if self.compiled and hasattr(torch.compiler, "cudagraph_mark_step_begin"):
            torch.compiler.cudagraph_mark_step_begin()
        if self.dtype is None:
            return self._fn(images, magnitudes).float()
        # cache_enabled=False: required under CUDA graph capture, and free here (each weight is cast once per
        # forward either way)
        with torch.autocast(device_type="cuda", dtype=self.dtype, cache_enabled=False):
            return self._fn(images, magnitudes).float()


def cuda_runner(model: nn.Module, mode: str, compile: bool = False) -> CudaRunner:
    """The runner ``fast.prepare`` returns for a CUDA device (TF32 is switched off here)."""
    disable_tf32()
    return CudaRunner(model, mode, compiled=bool(compile))


def _step(run: Callable, x: torch.Tensor, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward over a chunk: non-finite rows are zeroed (in place) before it and come back NaN."""
    ok = torch.isfinite(x).flatten(1).all(1) & torch.isfinite(m).all(1)
    x.masked_fill_(~ok.view(-1, 1, 1, 1), 0.0)
    m.masked_fill_(~ok.view(-1, 1), 0.0)
    z = run(x, m).float()
    return torch.where(ok, z, torch.full_like(z, float("nan"))), ~ok


def _host_empty(shape: tuple[int, ...], dtype: torch.dtype, pin: bool) -> torch.Tensor:
    """A host buffer, page-locked (pinned) for asynchronous copies when ``pin``."""
    return torch.empty(shape, dtype=dtype, pin_memory=pin)


@dataclass
class _Slot:
    host_x: torch.Tensor
    host_m: torch.Tensor
    dev_x: torch.Tensor
    dev_m: torch.Tensor
    copied: Any = None     # event: this slot's host->device copy finished (its pinned buffers may be refilled)
    consumed: Any = None   # event: the forward that read this slot's device buffers finished


@dataclass
class FeedStats:
    """What the feed did (cumulative): calls, rows, forwards, graph captures, out-of-memory retries."""

    calls: int = 0
    rows: int = 0
    forwards: int = 0
    padded_rows: int = 0
    captures: int = 0
    oom_retries: int = 0
    sizes: dict[int, int] = field(default_factory=dict)


class DeviceFeed:
    """Predicts arrays through ``runner`` on ``device`` in chunks of ``rows`` (see the module docstring).

    ``graphs``: capture CUDA graphs (CUDA only; chunks padded to multiples of 256). ``pad``: ``none``,
    ``align`` or ``pow2`` (default: ``align`` with graphs, ``pow2`` for a compiled runner, else ``none``).
    ``copy_threads``: threads filling the staging buffers. ``slots``: staging buffers in flight (2 = double
    buffering)."""

    def __init__(self, runner: Callable, device: torch.device | str, *, rows: int, graphs: bool = False,
                 pad: str | None = None, copy_threads: int = 1, slots: int = 2, max_graphs: int = MAX_GRAPHS):
        self.runner = runner
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        if rows < 1 or slots < 1 or copy_threads < 1:
            raise ModelError(f"feed: rows, slots and copy_threads must be >= 1 (got {rows}, {slots}, {copy_threads})")
        self.rows = int(rows)
        self.graphs = bool(graphs) and self.cuda
        compiled = bool(getattr(runner, "compiled", False))
        self.pad = pad or ("align" if self.graphs else "pow2" if compiled else "none")
        self.slots = int(slots)
        self.copy_threads = int(copy_threads)
        self.max_graphs = int(max_graphs)
        self.stats = FeedStats()
        self._slots: list[_Slot] = []
        self._capacity = 0
        self._graphs: dict[int, tuple] = {}
        self._pool = ThreadPoolExecutor(self.copy_threads, thread_name_prefix="cai-feed") \
            if self.copy_threads > 1 else None
        self._copy_stream = torch.cuda.Stream(self.device) if self.cuda else None
        self._host_z: torch.Tensor | None = None
        self._host_bad: torch.Tensor | None = None

    # ------------------------------------------------------------------ buffers
    def _alloc(self, capacity: int) -> None:
        """(Re)allocate the slots for chunks of ``capacity`` rows; only between calls (nothing in flight)."""
        if capacity <= self._capacity:
            return
        pin = self.cuda
        self._slots = []
        for _ in range(self.slots):
            host_x = _host_empty((capacity, 5, 32, 32), torch.float32, pin)
            host_m = _host_empty((capacity, 5), torch.float32, pin)
            if self.cuda:
                slot = _Slot(host_x, host_m, torch.empty_like(host_x, device=self.device),
                             torch.empty_like(host_m, device=self.device), torch.cuda.Event(), torch.cuda.Event())
            else:  # no device: the staging buffers are what the network reads
                slot = _Slot(host_x, host_m, host_x, host_m)
            self._slots.append(slot)
        self._capacity = capacity

    def _out_buffers(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._host_z is None or self._host_z.shape[0] < n:
            self._host_z = _host_empty((n,), torch.float32, self.cuda)
            self._host_bad = _host_empty((n,), torch.bool, self.cuda)
        return self._host_z[:n], self._host_bad[:n]  # type: ignore[index]

    def _fill(self, dst: np.ndarray, src: np.ndarray) -> None:
        """Copy ``src`` rows into ``dst`` (the pinned staging view), split over the copy threads when large."""
        k = src.shape[0]
        if self._pool is None or k * src[0].nbytes < (4 << 20):
            np.copyto(dst, src)
            return
        step = math.ceil(k / self.copy_threads)
        list(self._pool.map(lambda a: np.copyto(dst[a:a + step], src[a:a + step]), range(0, k, step)))

    # ------------------------------------------------------------------ forwards
    def _graph(self, size: int) -> tuple | None:
        """The captured forward for chunks padded to ``size`` rows (captured on first use), or None."""
        entry = self._graphs.get(size)
        if entry is not None or len(self._graphs) >= self.max_graphs:
            return entry
        static_x = torch.zeros((size, 5, 32, 32), dtype=torch.float32, device=self.device)
        static_m = torch.zeros((size, 5), dtype=torch.float32, device=self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # warm-up: cuDNN/cuBLAS choose their kernels outside the capture
            for _ in range(2):
                _step(self.runner, static_x, static_m)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            z, bad = _step(self.runner, static_x, static_m)
        entry = (graph, static_x, static_m, z, bad)
        self._graphs[size] = entry
        self.stats.captures += 1
        return entry

    def _forward(self, slot: _Slot, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Predictions and non-finite flags (device tensors, >= k rows) of the slot's first ``k`` rows."""
        size = padded_rows(k, self.rows, self.pad)
        self.stats.forwards += 1
        self.stats.padded_rows += size - k
        self.stats.sizes[size] = self.stats.sizes.get(size, 0) + 1
        entry = self._graph(size) if self.graphs else None
        if entry is not None:
            graph, static_x, static_m, z, bad = entry
            static_x[:k].copy_(slot.dev_x[:k])
            static_m[:k].copy_(slot.dev_m[:k])
            if size > k:
                static_x[k:].zero_()
                static_m[k:].zero_()
            graph.replay()
            return z, bad
        x, m = slot.dev_x[:size], slot.dev_m[:size]
        if size > k:
            x[k:].zero_()
            m[k:].zero_()
        return _step(self.runner, x, m)

    # ------------------------------------------------------------------ predict
    def predict(self, images: np.ndarray, magnitudes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(z float32 [N], flagged int64 row indices)`` for validated float32 arrays (see the module docstring).

        A CUDA out-of-memory error halves the rows per forward (down to 1) and redoes the call."""
        while True:
            try:
                if not self.cuda:
                    return self._predict(images, magnitudes)
                with torch.cuda.device(self.device):  # streams, events and graphs of this device
                    return self._predict(images, magnitudes)
            except torch.cuda.OutOfMemoryError:
                if self.rows <= 1:
                    raise
                if self.cuda:  # copies may still be writing into the buffers about to be dropped
                    torch.cuda.synchronize(self.device)
                self.rows = max(1, self.rows // 2)
                self._graphs.clear()
                self._slots, self._capacity = [], 0
                self.stats.oom_retries += 1
                torch.cuda.empty_cache()

    def _predict(self, images: np.ndarray, magnitudes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n = int(images.shape[0])
        self.stats.calls += 1
        self.stats.rows += n
        if n == 0:
            return np.zeros(0, dtype=np.float32), np.zeros(0, dtype=np.int64)
        runner_mode = getattr(self.runner, "mode", None)
        if self.cuda and runner_mode == "exact":
            disable_tf32()  # someone may have switched TF32 on since the predictor was built
        chunk = min(self.rows, n)
        self._alloc(padded_rows(chunk, self.rows, self.pad))
        dev = self.device
        out = torch.empty(n, dtype=torch.float32, device=dev)
        bad = torch.empty(n, dtype=torch.bool, device=dev)
        compute = torch.cuda.current_stream(dev) if self.cuda else None
        with torch.inference_mode():
            for i, start in enumerate(range(0, n, chunk)):
                k = min(chunk, n - start)
                slot = self._slots[i % self.slots]
                if self.cuda:
                    slot.copied.synchronize()  # the copy of chunk i - slots has left the pinned buffers
                self._fill(slot.host_x.numpy()[:k], images[start:start + k])
                self._fill(slot.host_m.numpy()[:k], magnitudes[start:start + k])
                if self.cuda:
                    with torch.cuda.stream(self._copy_stream):
                        self._copy_stream.wait_event(slot.consumed)  # chunk i - slots' forward is done with them
                        slot.dev_x[:k].copy_(slot.host_x[:k], non_blocking=True)
                        slot.dev_m[:k].copy_(slot.host_m[:k], non_blocking=True)
                        slot.copied.record(self._copy_stream)
                    compute.wait_event(slot.copied)
                z, flags = self._forward(slot, k)
                out[start:start + k].copy_(z[:k])
                bad[start:start + k].copy_(flags[:k])
                if self.cuda:
                    slot.consumed.record(compute)
            host_z, host_bad = self._out_buffers(n)
            if self.cuda:
                host_z.copy_(out, non_blocking=True)
                host_bad.copy_(bad, non_blocking=True)
                done = torch.cuda.Event()
                done.record(compute)
                done.synchronize()  # the one host synchronisation of this call
            else:
                host_z.copy_(out)
                host_bad.copy_(bad)
        return host_z.numpy().copy(), np.flatnonzero(host_bad.numpy()).astype(np.int64)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None


def feed_for(runner: Callable, device: torch.device, mode: str, rows: int | None = None) -> DeviceFeed:
    """The feed a CUDA predictor uses: rows from ``rows``, else ``CAI_CUDA_ROWS``, else :func:`auto_rows` of the
    device's free memory; graphs from ``CAI_CUDA_GRAPHS``; copy threads from ``CAI_CUDA_COPY_THREADS``."""
    rows = rows or _env_int(ENV_ROWS)
    if rows is None:
        free, _total = torch.cuda.mem_get_info(device)
        rows = auto_rows(free, mode)
    threads = _env_int(ENV_COPY_THREADS) or min(4, os.cpu_count() or 1)
    return DeviceFeed(runner, device, rows=rows, graphs=_flag(ENV_GRAPHS), copy_threads=threads)
