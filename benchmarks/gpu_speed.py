"""AstroMAE on one GPU: the authors' GPU loop against ours (model only), then a whole 12.6 GB dataset through
``cai run --device cuda``, in one run.

(a) Model only, on the same arrays in one process, paired repeats (ratios are taken within a repeat):

* the authors' GPU loop, re-created from their ``code/Anomaly Detection/Inference/inference.py`` (mstaylor/
  AI-for-Astronomy at 4b02140, the version with batch 512 and the profiler): the TensorDataset loaded onto the
  device (their ``torch.load(map_location=device)``: magnitudes float64, as their partitions hold them), a
  DataLoader of batch 512, ``torch.profiler.profile(CPU + CUDA, profile_memory=True, record_shapes=True)`` around
  the loop, ``torch.no_grad()`` and ``record_function("model_inference")`` per batch, predictions kept on the
  device and concatenated at the end; the straightforward fp32 module, called as ``model([images, magnitudes])``;
  the torch defaults for TF32 (what their run had). Timed to predictions on the host; their
  ``prof.key_averages()`` post-processing is timed separately.
* the CAI worker loop on the GPU (``benchmarks/model_speed.py``'s ``original_loop`` with a device): host
  TensorDataset, batch 512, profiler, ``no_grad``, ``.cpu().numpy()`` and ``gc.collect()`` after every batch,
  ``nn.DataParallel``.
* ours: ``Predictor.predict`` in exact (fp32, TF32 off) and fast (fp16 autocast) mode, from host arrays (the
  copies to the device are included), eager and with CUDA graphs; the forward alone on device-resident inputs
  (the compute bound); and calls of 25 MB partitions (1,277 rows each). GPU time from CUDA events.

(b) A synthetic dataset (numpy random galaxies, no galsim) written as native partitions with cosmicai's writers,
replicated (or resampled) on local disk to 659,817 galaxies (12.6 GiB of input, 13.5 GB on disk), run through
``python -m cosmicai.cli run --device cuda`` in a subprocess per mode; prints every stage's wall time (dataset,
plan, map, summarize; fetch, decode, model load, fast check, inference, write, wait summed over ranks),
galaxies/s, and GPU busy time sampled with ``nvidia-smi`` (when present).

    python benchmarks/gpu_speed.py                       # on the GPU machine: (a) then (b), ~3-4 minutes
    python benchmarks/gpu_speed.py --skip-b --samples 65536 --repeats 3
    python benchmarks/gpu_speed.py --b-modes fast,exact,fast+graphs --partition-size 512MB
    python benchmarks/gpu_speed.py --cpu-smoke           # tiny sizes on CPU: checks that everything runs

Needs torch, numpy, safetensors, pyarrow, fsspec, tqdm (psutil optional); imports nothing from galsim, astropy,
dask or boto3 (it checks and prints so at the end).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile, record_function
from torch.utils.data import DataLoader, TensorDataset

from cosmicai.data.formats import (NATIVE_SAMPLE_BYTES, Manifest, Partition, PartitionEntry, encode_partition,
                                   sha256_hex, write_manifest)
from cosmicai.models.guard import max_dz
from cosmicai.models.astromae import demo_weights_path
from cosmicai.models.registry import load_model

HEAVY = ("galsim", "astropy", "dask", "distributed", "boto3")
FULL_GALAXIES = 659_817          # the paper's 12.6 GB set
PARTITION_25MB_ROWS = 25 * 2**20 // NATIVE_SAMPLE_BYTES   # 1,277: the paper's partition size
AUTHORS = "authors' GPU loop (inference.py)"
CAI_LOOP = "CAI worker loop (+gc.collect/batch)"


def say(text: str = "") -> None:
    print(text, flush=True)


# --------------------------------------------------------------------------- synthetic galaxies (numpy only)

def fake_galaxies(n: int, seed: int = 0, first_id: int = 0) -> Partition:
    """``n`` random but galaxy-like rows: a Gaussian blob per band (1-100 nanomaggies, 1-4 px) plus noise;
    magnitudes from the fluxes; redshift 0.01-0.4. Made in chunks (bounded memory)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:32, :32].astype(np.float32) - 15.5
    r2 = (yy ** 2 + xx ** 2)[None]
    images = np.empty((n, 5, 32, 32), dtype=np.float32)
    mags = np.empty((n, 5), dtype=np.float32)
    for a in range(0, n, 4096):
        k = min(4096, n - a)
        size = rng.uniform(1.0, 4.0, (k, 1, 1)).astype(np.float32)
        flux = (10 ** rng.uniform(0.0, 2.0, (k, 5))).astype(np.float32)
        blob = np.exp(-r2 / (2 * size ** 2)) / (2 * np.pi * size ** 2)
        images[a:a + k] = flux[:, :, None, None] * blob[:, None] + rng.normal(0, 0.05, (k, 5, 32, 32))
        mags[a:a + k] = 22.5 - 2.5 * np.log10(flux) + rng.normal(0, 0.02, (k, 5))
    z = rng.uniform(0.01, 0.4, n).astype(np.float32)
    return Partition(images, mags, np.arange(first_id, first_id + n, dtype=np.int64), z)


# --------------------------------------------------------------------------- (a) the loops

class _AuthorsCall(nn.Module):
    """Their calling convention: ``model([images, magnitudes]) -> [N, 1]``; their model casts magnitudes to fp32."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        return self.module(inputs[0], inputs[1].float()).view(-1, 1)


def authors_gpu_loop(model: nn.Module, data: TensorDataset, device: torch.device, batch_size: int = 512
                     ) -> tuple[np.ndarray, Any]:
    """Their ``inference()`` (4b02140) without the plots: returns the predictions (on the host) and the profiler."""
    dataloader = DataLoader(data, batch_size=batch_size, drop_last=False)
    redshift_analysis = []
    num_batches = 0
    total_data_bits = 0
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, profile_memory=True, record_shapes=True) as prof:
        for i, batch in enumerate(dataloader):
            with torch.no_grad():
                image = batch[0].to(device)
                magnitude = batch[1].to(device)
                with record_function("model_inference"):
                    predict_redshift = model([image, magnitude])
                redshift_analysis.append(predict_redshift.view(-1, 1))
                num_batches += 1
                image_bits = image.element_size() * image.nelement() * 8
                magnitude_bits = magnitude.element_size() * magnitude.nelement() * 8
                total_data_bits += image_bits + magnitude_bits
    num_samples = len(data)
    redshift = torch.cat(redshift_analysis, dim=0).cpu().detach().numpy().reshape(num_samples,)
    return redshift, prof


def cai_worker_loop(model: nn.Module, images: np.ndarray, mags: np.ndarray, device: torch.device,
                    batch: int = 512) -> np.ndarray:
    """benchmarks/model_speed.py's ``original_loop`` (the CAI worker) with the model on ``device``."""
    loader = DataLoader(TensorDataset(torch.from_numpy(images), torch.from_numpy(mags)), batch_size=batch,
                        shuffle=False)
    preds = []
    model.eval()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, profile_memory=True), torch.no_grad():
        for image, magnitude in loader:
            image, magnitude = image.to(device), magnitude.to(device)
            preds.append(model(image, magnitude).cpu().numpy())
            gc.collect()
    return np.concatenate(preds)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Timer:
    """Wall time and (on CUDA) the GPU span between events on the current stream."""

    def __init__(self, device: torch.device):
        self.device = device
        self.wall = self.gpu = None

    def __enter__(self) -> "_Timer":
        _sync(self.device)
        if self.device.type == "cuda":
            self._e0, self._e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self._e0.record()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            self._e1.record()
        _sync(self.device)
        self.wall = time.perf_counter() - self._t0
        if self.device.type == "cuda":
            self.gpu = self._e0.elapsed_time(self._e1) / 1e3


def forward_only(pred: Any, x: torch.Tensor, m: torch.Tensor, rows: int) -> torch.Tensor:
    """The prepared runner over device-resident inputs in forwards of ``rows`` (no copies, no checks)."""
    outs = []
    with torch.inference_mode():
        for a in range(0, x.shape[0], rows):
            outs.append(pred._run(x[a:a + rows], m[a:a + rows]))
    return torch.cat(outs)


def _with_env(var: str, value: str, fn: Callable[[], Any]) -> Any:
    before = os.environ.get(var)
    os.environ[var] = value
    try:
        return fn()
    finally:
        if before is None:
            os.environ.pop(var, None)
        else:
            os.environ[var] = before


def part_a(args: argparse.Namespace, device: torch.device, name: str) -> dict[str, Any]:
    say(f"\n== (a) model only: {args.samples:,} galaxies, model {name}, device {device}, "
        f"median of {args.repeats} paired repeat(s)")
    cuda = device.type == "cuda"
    t = time.perf_counter()
    part = fake_galaxies(args.samples, seed=1)
    images, mags = part.images, part.magnitudes
    say(f"data: {args.samples:,} synthetic galaxies made in {time.perf_counter() - t:.1f} s "
        f"({images.nbytes / 1e9:.2f} GB of images)")

    t = time.perf_counter()
    exact = load_model(name, device=str(device), mode="exact", engine="torch")
    fast = load_model(name, device=str(device), mode="fast", engine="torch")
    preds: dict[str, Any] = {"exact (ours)": exact, "fast (ours)": fast}
    if cuda and not args.no_graphs:
        for mode in ("exact", "fast"):
            preds[f"{mode} (ours, CUDA graphs)"] = _with_env(
                "CAI_CUDA_GRAPHS", "1", lambda mode=mode: load_model(name, device=str(device), mode=mode,
                                                                      engine="torch"))
    if cuda and args.compile:
        for mode in ("exact", "fast"):
            preds[f"{mode} (ours, torch.compile)"] = load_model(name, device=str(device), mode=mode,
                                                                engine="torch", compile=True)
    say(f"load: {len(preds)} predictors in {time.perf_counter() - t:.1f} s; forward rows "
        f"{exact.forward_rows or 'n/a (CPU: batch_size)'}")

    # the authors' module: the straightforward fp32 network (no folding, no fused attention), on the device
    theirs = _AuthorsCall(copy.deepcopy(exact.module)).to(device).eval()
    dataset = TensorDataset(torch.from_numpy(images).to(device), torch.from_numpy(mags).double().to(device),
                            torch.from_numpy(part.redshift).to(device))
    cai_model = nn.DataParallel(copy.deepcopy(exact.module).to(device)) if cuda else copy.deepcopy(exact.module)

    tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    key_avg_s: list[float] = []

    def run_authors() -> np.ndarray:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = False, True  # torch's defaults
        try:
            z, prof = authors_gpu_loop(theirs, dataset, device)
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
        t0 = time.perf_counter()
        prof.key_averages().total_average()
        key_avg_s.append(time.perf_counter() - t0)
        return z

    methods: dict[str, Callable[[], Any]] = {AUTHORS: run_authors}
    if not args.no_cai_loop:
        methods[CAI_LOOP] = lambda: cai_worker_loop(cai_model, images, mags, device)
    for label, pred in preds.items():
        methods[label] = lambda pred=pred: pred.predict(images, mags, batch_size=512)
    step = PARTITION_25MB_ROWS
    methods["fast (ours, 25 MB partitions)"] = lambda: np.concatenate(
        [fast.predict(images[a:a + step], mags[a:a + step], batch_size=512) for a in range(0, len(images), step)])
    if cuda:
        x_dev, m_dev = torch.from_numpy(images).to(device), torch.from_numpy(mags).to(device)
        rows = exact.forward_rows or 512
        for label, pred in (("exact forward only (inputs on device)", exact),
                            ("fast forward only (inputs on device)", fast)):
            methods[label] = lambda pred=pred: forward_only(pred, x_dev, m_dev, rows).float().cpu().numpy()

    first: dict[str, float] = {}
    outputs: dict[str, np.ndarray] = {}
    for label, fn in methods.items():  # warm-up (cuDNN/cuBLAS set-up, graph capture) and outputs
        with _Timer(device) as tm:
            outputs[label] = np.asarray(fn(), dtype=np.float32)
        first[label] = tm.wall
    walls: dict[str, list[float]] = {k: [] for k in methods}
    gpus: dict[str, list[float]] = {k: [] for k in methods}
    for _ in range(args.repeats):
        for label, fn in methods.items():
            with _Timer(device) as tm:
                fn()
            walls[label].append(tm.wall)
            if tm.gpu is not None:
                gpus[label].append(tm.gpu)

    say(f"{'method':40s} {'galaxies/s':>12s} {'x authors':>10s} {'wall s':>8s} {'GPU span s':>10s} "
        f"{'first call s':>12s}  max |dz| vs exact (ours)")
    ref = outputs["exact (ours)"]
    table: dict[str, Any] = {}
    for label in methods:
        wall = statistics.median(walls[label])
        ratios = [a / w for a, w in zip(walls[AUTHORS], walls[label])]
        gpu = statistics.median(gpus[label]) if gpus[label] else None
        dz = max_dz(outputs[label], ref)
        table[label] = {"galaxies_per_s": args.samples / wall, "x_authors": statistics.median(ratios),
                        "x_authors_range": [min(ratios), max(ratios)], "wall_s": wall, "gpu_span_s": gpu,
                        "first_call_s": first[label], "max_dz_vs_exact": dz}
        say(f"{label:40s} {args.samples / wall:12,.0f} {statistics.median(ratios):10.2f} {wall:8.3f} "
            f"{(f'{gpu:.3f}' if gpu is not None else '-'):>10s} {first[label]:12.2f}  {dz:.2e}")
    say(f"their profiler post-processing (prof.key_averages): {statistics.median(key_avg_s):.2f} s per run, "
        "not counted above")
    for label in ("exact (ours)", "fast (ours)"):
        for pred in (preds[label],):
            feed = getattr(pred, "_feed", None)
            if feed is not None:
                say(f"{label}: feed rows/forward {feed.rows}, padding {feed.pad}, forwards {feed.stats.forwards}, "
                    f"copy threads {feed.copy_threads}, graph captures {feed.stats.captures}, "
                    f"out-of-memory retries {feed.stats.oom_retries}")
    graphs = preds.get("fast (ours, CUDA graphs)")
    if graphs is not None and graphs._feed is not None:
        say(f"CUDA graphs: {graphs._feed.stats.captures} captured size(s) {sorted(graphs._feed._graphs)}")

    # accuracy in the same run: ours exact against CPU exact (torch engine), fast against exact
    checks: dict[str, Any] = {}
    k = min(args.cpu_rows, args.samples)
    if cuda and k:
        t = time.perf_counter()
        cpu_exact = load_model(name, device="cpu", mode="exact", engine="torch")
        z_cpu = cpu_exact.predict(images[:k], mags[:k], batch_size=512)
        checks["exact_cuda_vs_cpu_max_dz"] = max_dz(ref[:k], z_cpu)
        say(f"exact on {device} vs exact on CPU ({k:,} rows, {time.perf_counter() - t:.1f} s): max |dz| "
            f"{checks['exact_cuda_vs_cpu_max_dz']:.2e} (target <= 1e-5)")
    checks["fast_vs_exact_max_dz"] = max_dz(outputs["fast (ours)"], ref)
    checks["authors_vs_exact_max_dz"] = max_dz(outputs[AUTHORS], ref)
    say(f"fast vs exact (ours, {args.samples:,} rows): max |dz| {checks['fast_vs_exact_max_dz']:.2e} "
        f"(tolerance 2e-3); authors' loop vs exact (ours): {checks['authors_vs_exact_max_dz']:.2e}")
    if cuda:
        say(f"peak GPU memory allocated: {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB")
    del dataset, theirs, cai_model, preds, exact, fast
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return {"samples": args.samples, "repeats": args.repeats, "methods": table, "checks": checks,
            "authors_key_averages_s": statistics.median(key_avg_s)}


# --------------------------------------------------------------------------- (b) the whole dataset

def parse_size(text: str) -> int:
    units = {"KB": 2**10, "MB": 2**20, "GB": 2**30}
    text = text.strip().upper()
    for unit, mult in units.items():
        if text.endswith(unit):
            return int(float(text[:-len(unit)]) * mult)
    return int(text)


def make_dataset(root: Path, galaxies: int, partition_bytes: int, how: str) -> tuple[str, dict[str, Any]]:
    """A native dataset of ``galaxies`` rows in partitions of ``partition_bytes`` under ``root``; reused when
    one with the same parameters exists. ``resample``: ``cosmicai.data.resample`` (cycle) over a one-partition
    synthetic source; ``replicate``: the same files (same names, rows, bytes and checksums: checked on CPU)
    written by copying the source partition instead of re-encoding it, ~4x faster (distinct files; object ids
    repeat, as resampled rows do)."""
    per = max(1, partition_bytes // NATIVE_SAMPLE_BYTES)
    key = {"galaxies": galaxies, "rows_per_partition": per, "how": how, "version": 1}
    data = root / f"data-{galaxies}-{per}-{how}"
    info = data / "gpu_speed.json"
    if info.exists() and json.loads(info.read_text()) == key:
        return str(data), {"reused": True, "seconds": 0.0}
    shutil.rmtree(data, ignore_errors=True)
    t0 = time.perf_counter()
    source = root / f"source-{per}"
    shutil.rmtree(source, ignore_errors=True)
    source.mkdir(parents=True)
    part = fake_galaxies(min(per, galaxies), seed=2)
    blob = encode_partition(part)
    (source / "1.safetensors").write_bytes(blob)
    digest = sha256_hex(blob)
    write_manifest(str(source), Manifest([PartitionEntry("1.safetensors", len(part), len(blob), digest, 0)],
                                         has_redshift=True, description="gpu_speed synthetic source"))
    if how == "resample":
        from cosmicai.data.resample import resample

        resample(str(source), str(data), galaxies * NATIVE_SAMPLE_BYTES, per * NATIVE_SAMPLE_BYTES)
    else:
        data.mkdir(parents=True)
        nparts = math.ceil(galaxies / per)
        width = len(str(nparts))
        entries, first = [], 0
        for i in range(nparts):
            k = min(per, galaxies - first)
            fname = f"{i + 1:0{width}d}.safetensors"
            if k == len(part):
                shutil.copyfile(source / "1.safetensors", data / fname)
                entries.append(PartitionEntry(fname, k, len(blob), digest, first))
            else:
                last = encode_partition(part.take(slice(0, k)))
                (data / fname).write_bytes(last)
                entries.append(PartitionEntry(fname, k, len(last), sha256_hex(last), first))
            first += k
        write_manifest(str(data), Manifest(entries, has_redshift=True,
                                           description=f"gpu_speed: {galaxies} rows replicated from {per}"))
    info.write_text(json.dumps(key))
    return str(data), {"reused": False, "seconds": time.perf_counter() - t0}


class GpuSampler:
    """``nvidia-smi`` polled every ``interval`` s in the background: utilisation and memory over a run."""

    def __init__(self, interval: float = 0.1):
        self.interval = interval
        self.samples: list[tuple[float, float, float]] = []
        self._proc: subprocess.Popen | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> bool:
        exe = shutil.which("nvidia-smi")
        if exe is None:
            return False
        self._proc = subprocess.Popen([exe, "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits",
                                       f"--loop-ms={int(self.interval * 1000)}", "--id=0"], stdout=subprocess.PIPE,
                                      stderr=subprocess.DEVNULL, text=True)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        return True

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            try:
                util, mem = (float(v) for v in line.strip().split(",")[:2])
            except ValueError:
                continue
            self.samples.append((time.perf_counter(), util, mem))

    def stop(self) -> dict[str, Any] | None:
        if self._proc is None:
            return None
        self._proc.terminate()
        self._proc.wait(5)
        if self._thread is not None:
            self._thread.join(2)
        if not self.samples:
            return {"samples": 0}
        utils = [u for _, u, _ in self.samples]
        return {"samples": len(utils), "busy_s": sum(u / 100 * self.interval for u in utils),
                "mean_util_pct": statistics.mean(utils), "max_util_pct": max(utils),
                "peak_memory_mib": max(m for _, _, m in self.samples)}


def run_cai(data: str, result: str, device: str, mode: str, args: argparse.Namespace) -> dict[str, Any]:
    base_mode, _, extra = mode.partition("+")
    env = dict(os.environ)
    if extra == "graphs":
        env["CAI_CUDA_GRAPHS"] = "1"
    elif extra == "compile":
        env["CAI_COMPILE"] = "1"
    if device == "cpu":
        env.setdefault("CAI_ENGINE", "torch")  # the engine the CUDA path uses
    cmd = [sys.executable, "-m", "cosmicai.cli", "run", "--data", data, "--result", result, "--device", device,
           "--mode", base_mode, "--batch-size", "512", "--world-size", str(args.world_size), "--workers", "1",
           "--overwrite", "--quiet"]
    sampler = GpuSampler()
    sampling = device.startswith("cuda") and sampler.start()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.run_timeout)
    wall = time.perf_counter() - t0
    gpu = sampler.stop() if sampling else None
    out: dict[str, Any] = {"mode": mode, "rc": proc.returncode, "wall_s": wall, "gpu": gpu,
                           "command": " ".join(cmd)}
    summary_path = Path(result) / "summary.json"
    if proc.returncode != 0 or not summary_path.exists():
        out["stderr_tail"] = proc.stderr[-3000:]
        out["stdout_tail"] = proc.stdout[-2000:]
        return out
    summary = json.loads(summary_path.read_text())
    out.update({"rows_out": (summary.get("completeness") or {}).get("rows_out"),
                "stages": summary.get("stages"), "map_wall_s": summary.get("map_wall_s"),
                "samples_per_s": summary.get("samples_per_s"), "phases_total_s": summary.get("phases_total_s"),
                "mode_used": summary.get("mode_used"), "fast_check": summary.get("fast_check"),
                "report_tail": proc.stdout[-1500:]})
    return out


def part_b(args: argparse.Namespace, device: str) -> dict[str, Any]:
    root = Path(args.workdir)
    root.mkdir(parents=True, exist_ok=True)
    pbytes = parse_size(args.partition_size)
    say(f"\n== (b) whole dataset: {args.galaxies:,} galaxies ({args.galaxies * NATIVE_SAMPLE_BYTES / 2**30:.1f} GiB "
        f"on disk, {args.galaxies * (5 * 32 * 32 + 5) * 4 / 2**30:.1f} GiB of model input), partitions of "
        f"{args.partition_size} ({max(1, pbytes // NATIVE_SAMPLE_BYTES):,} rows), world size {args.world_size}, "
        f"under {root}")
    data, made = make_dataset(root, args.galaxies, pbytes, args.make)
    nfiles = len(list(Path(data).glob("*.safetensors")))
    took = "reused" if made["reused"] else f"{made['seconds']:.1f} s"
    say(f"stage dataset ({args.make}): {took}, {nfiles} partitions in {data}")
    runs = []
    for mode in args.b_modes.split(","):
        result = str(root / f"result-{mode.replace('+', '-')}")
        say(f"-- cai run --device {device} --mode {mode} ...")
        run = run_cai(data, result, device, mode, args)
        runs.append(run)
        if run["rc"] != 0 or run.get("rows_out") is None:
            say(f"   FAILED (rc {run['rc']}):\n{run.get('stderr_tail', '')}")
            continue
        st = run.get("stages") or {}
        ph = run.get("phases_total_s") or {}
        map_s = st.get("map_s") or run.get("map_wall_s") or float("nan")
        say(f"   rows out {run['rows_out']:,}; mode used {run.get('mode_used')}"
            + (f"; fast check max |dz| {run['fast_check'].get('max_dz')}" if run.get("fast_check") else ""))
        say(f"   stages: cai run wall {run['wall_s']:.2f} s (process start, imports and CUDA init included) | "
            f"plan {st.get('plan_s', float('nan')):.2f} s | map stage {map_s:.2f} s | summarize "
            f"{st.get('summarize_s', float('nan')):.2f} s")
        say("   map phases summed over ranks: " + ", ".join(f"{k} {v:.2f} s" for k, v in ph.items()))
        say(f"   galaxies/s: {run['rows_out'] / map_s:,.0f} over the map stage, {run['rows_out'] / run['wall_s']:,.0f} "
            "over the whole command")
        gpu = run.get("gpu")
        if gpu and gpu.get("samples"):
            say(f"   GPU (nvidia-smi, {gpu['samples']} samples at 0.1 s): busy {gpu['busy_s']:.2f} s, mean "
                f"utilisation {gpu['mean_util_pct']:.0f}% (max {gpu['max_util_pct']:.0f}%), peak memory "
                f"{gpu['peak_memory_mib']:,.0f} MiB")
        elif device.startswith("cuda"):
            say("   GPU busy: nvidia-smi not available")
    if args.clean:
        shutil.rmtree(root, ignore_errors=True)
    return {"galaxies": args.galaxies, "partition_size": args.partition_size, "make": args.make,
            "dataset": made, "partitions": nfiles, "runs": runs}


# --------------------------------------------------------------------------- main

def machine(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
                            "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()}
    try:
        with open("/proc/cpuinfo") as fh:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpu_memory_gib"] = torch.cuda.get_device_properties(device).total_memory / 2**30
        exe = shutil.which("nvidia-smi")
        if exe:
            q = subprocess.run([exe, "--query-gpu=name,driver_version,pcie.link.gen.max,pcie.link.width.max",
                                "--format=csv,noheader"], capture_output=True, text=True)
            info["nvidia_smi"] = q.stdout.strip()
    return info


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--model", default=None, help="astromae-demo when its weights exist, else astromae-random")
    p.add_argument("--samples", type=int, default=32768, help="(a) galaxies (default 32,768)")
    p.add_argument("--repeats", type=int, default=2, help="(a) paired repeats after a warm-up (default 2)")
    p.add_argument("--cpu-rows", type=int, default=2048, help="(a) rows checked against CPU exact (default 2,048)")
    p.add_argument("--no-graphs", action="store_true", help="(a) skip the CUDA-graph predictors")
    p.add_argument("--compile", action="store_true", help="(a) also torch.compile(mode='reduce-overhead') (slow)")
    p.add_argument("--no-cai-loop", action="store_true", help="(a) skip the CAI worker loop")
    p.add_argument("--galaxies", type=int, default=FULL_GALAXIES, help="(b) dataset rows (default 659,817)")
    p.add_argument("--partition-size", default="256MB", help="(b) partition size (default 256MB)")
    p.add_argument("--world-size", type=int, default=1, help="(b) ranks (default 1: one rank, partitions prefetched)")
    p.add_argument("--b-modes", default="fast,exact",
                   help="(b) comma-separated runs: exact, fast, and +graphs / +compile variants (default fast,exact)")
    p.add_argument("--make", choices=("replicate", "resample"), default="replicate",
                   help="(b) how the dataset is grown from the synthetic partition (default replicate)")
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "cai-gpu-speed"),
                   help="(b) local folder for the dataset and results (reused between runs)")
    p.add_argument("--run-timeout", type=float, default=420.0, help="(b) seconds per cai run")
    p.add_argument("--clean", action="store_true", help="(b) delete the dataset and results afterwards")
    p.add_argument("--skip-a", action="store_true")
    p.add_argument("--skip-b", action="store_true")
    p.add_argument("--json", default=None, help="write every number to this JSON file")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="tiny sizes on CPU (checks that the benchmark runs end to end; the numbers mean nothing)")
    args = p.parse_args(argv)
    if args.cpu_smoke:
        args.device, args.samples, args.repeats, args.galaxies = "cpu", 96, 1, 700
        args.partition_size, args.cpu_rows, args.no_cai_loop = "2MB", 0, False
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        say(f"device {args.device}: torch {torch.__version__} sees no CUDA GPU (use --cpu-smoke to test on CPU)")
        return 2
    name = args.model or ("astromae-demo" if os.path.exists(demo_weights_path()) else "astromae-random")
    info = machine(device)
    say("machine: " + ", ".join(f"{k} {v}" for k, v in info.items()))
    env = {k: v for k, v in os.environ.items() if k.startswith("CAI_") or k == "CUDA_VISIBLE_DEVICES"}
    if env:
        say(f"environment: {env}")
    report: dict[str, Any] = {"device": str(device), "model": name, "machine": info}
    t0 = time.perf_counter()
    if not args.skip_a:
        report["a"] = part_a(args, device, name)
    if not args.skip_b:
        report["b"] = part_b(args, args.device)
    heavy = sorted({m.split(".")[0] for m in sys.modules if m.split(".")[0] in HEAVY})
    report["heavy_modules"] = heavy
    say(f"\nheavy modules imported: {', '.join(heavy) if heavy else 'none'} (checked: {', '.join(HEAVY)}); "
        f"total {time.perf_counter() - t0:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=str))
    failed = [r for r in (report.get("b") or {}).get("runs", []) if r["rc"] != 0]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
