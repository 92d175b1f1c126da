"""The CUDA path, on CPU: the feed (chunking, padding, ordering, non-finite rows) against Predictor.predict, batch
sizing from a free-memory figure, the CUDA runner's precision settings, one worker per GPU in the local backend,
and benchmarks/gpu_speed.py end to end with its --cpu-smoke flag. What only a GPU can show (speed, exact within
1e-5 of CPU exact, fast within 2e-3, graph capture) is measured by benchmarks/gpu_speed.py on a GPU machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cosmicai.errors import ConfigError, ModelError
from cosmicai.models.astromae import cuda_feed
from cosmicai.models.astromae.cuda_feed import DeviceFeed, auto_rows, padded_rows
from cosmicai.models.registry import load_model

ROOT = Path(__file__).resolve().parents[1]
GiB = 1 << 30


@pytest.fixture(scope="module")
def exact_torch():
    return load_model("astromae-random", mode="exact", engine="torch", threads=1)


def _inputs(n: int, seed: int = 0, bad: tuple[int, ...] = ()) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.normal(0.0, 0.3, (n, 5, 32, 32)).astype(np.float32)
    mags = rng.uniform(16, 24, (n, 5)).astype(np.float32)
    for j, row in enumerate(r for r in bad if r < n):
        if j % 3 == 0:
            images[row, j % 5, 3, 4] = np.nan
        elif j % 3 == 1:
            mags[row, 2] = np.inf
        else:
            images[row, 0, 0, 0] = -np.inf
    return images, mags


# --------------------------------------------------------------------------- batch sizing (pure functions)

def test_auto_rows_from_free_memory():
    assert auto_rows(140 * GiB, "exact") == 16384          # an H200: capped
    assert auto_rows(140 * GiB, "fast") == 16384
    assert auto_rows(24 * GiB, "exact") == 8192            # 12 GiB usable at 1 MiB a row -> 12,288 -> 8,192
    assert auto_rows(24 * GiB, "fast") == 16384            # half-precision rows are half the size
    assert auto_rows(2 * GiB, "exact") == 1024
    assert auto_rows(100 << 20, "exact") == 256            # tiny: the floor
    assert auto_rows(0, "exact") == 256
    assert auto_rows(8 * GiB, "exact", max_rows=2048, min_rows=64) == 2048
    sizes = [auto_rows(f * GiB, "exact") for f in (1, 2, 4, 8, 16, 32, 64, 128)]
    assert sizes == sorted(sizes) and all(s & (s - 1) == 0 for s in sizes)  # monotone powers of two


def test_padded_rows_policies():
    assert [padded_rows(k, 16384, "none") for k in (1, 300, 16384)] == [1, 300, 16384]
    assert [padded_rows(k, 16384, "align") for k in (1, 256, 257, 1277, 16384)] == [256, 256, 512, 1280, 16384]
    assert [padded_rows(k, 16384, "pow2") for k in (1, 256, 257, 1277, 9000)] == [256, 256, 512, 2048, 16384]
    assert padded_rows(100, 128, "align") == 128 and padded_rows(200, 200, "pow2") == 200  # never past rows
    with pytest.raises(ValueError):
        padded_rows(0, 10, "none")
    with pytest.raises(ValueError):
        padded_rows(3, 10, "odd")


def test_env_knobs_are_parsed_and_refused_by_name(monkeypatch, exact_torch):
    monkeypatch.setenv("CAI_CUDA_ROWS", "lots")
    with pytest.raises(ModelError, match="CAI_CUDA_ROWS='lots' is not an integer"):
        cuda_feed.feed_for(exact_torch._run, torch.device("cpu"), "exact")
    monkeypatch.setenv("CAI_CUDA_ROWS", "0")
    with pytest.raises(ModelError, match="CAI_CUDA_ROWS=0 must be >= 1"):
        cuda_feed.feed_for(exact_torch._run, torch.device("cpu"), "exact")
    monkeypatch.setenv("CAI_CUDA_ROWS", "96")
    monkeypatch.setenv("CAI_CUDA_GRAPHS", "1")
    monkeypatch.setenv("CAI_CUDA_COPY_THREADS", "3")
    feed = cuda_feed.feed_for(exact_torch._run, torch.device("cpu"), "exact")
    assert (feed.rows, feed.copy_threads, feed.graphs, feed.pad) == (96, 3, False, "none")  # no graphs on CPU
    assert cuda_feed.feed_for(exact_torch._run, torch.device("cpu"), "exact", rows=40).rows == 40
    assert cuda_feed.fast_dtype() is torch.float16
    monkeypatch.setenv("CAI_CUDA_FAST_DTYPE", "bf16")
    assert cuda_feed.fast_dtype() is torch.bfloat16
    monkeypatch.setenv("CAI_CUDA_FAST_DTYPE", "fp8")
    with pytest.raises(ModelError, match="CAI_CUDA_FAST_DTYPE='fp8' is not known"):
        cuda_feed.fast_dtype()


# --------------------------------------------------------------------------- the feed on CPU tensors

@pytest.mark.parametrize("n, rows, pad, threads, bad", [
    (1, 128, "none", 1, ()),
    (127, 128, "none", 1, ()),
    (300, 128, "none", 2, (0, 129, 299)),          # not a multiple of the chunk; bad rows in the first, second, last
    (257, 64, "align", 3, (5, 64, 65, 200)),       # padded forwards (zero rows after the chunk)
    (333, 100, "pow2", 1, tuple(range(0, 333, 37))),
])
def test_feed_matches_predictor_exactly(exact_torch, n, rows, pad, threads, bad):
    images, mags = _inputs(n, seed=n, bad=bad)
    before = images.copy(), mags.copy()
    want = exact_torch.predict(images, mags, batch_size=512)
    want_flagged = exact_torch.last_flagged
    feed = DeviceFeed(exact_torch._run, "cpu", rows=rows, pad=pad, copy_threads=threads)
    got, flagged = feed.predict(images, mags)
    assert got.dtype == np.float32 and got.shape == (n,)
    np.testing.assert_array_equal(flagged, want_flagged)
    assert flagged.tolist() == sorted(set(bad))
    assert np.isnan(got[flagged]).all() and np.isfinite(np.delete(got, flagged)).all()
    # Row order and values: the same numbers; bit for bit when both split the rows the same way (the plain
    # predictor compacts finite rows into chunks of 128, the feed zeroes bad rows in place and pads, so a row
    # can land in a GEMM of another height: <= a few float32 ulps)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    if not bad and rows == 128 and pad == "none":
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(images, before[0])  # the caller's arrays are not touched (NaNs included)
    np.testing.assert_array_equal(mags, before[1])
    assert feed.stats.forwards == -(-n // min(rows, n)) and feed.stats.rows == n


def test_feed_reuses_and_grows_buffers_and_reads_read_only_arrays(exact_torch):
    feed = DeviceFeed(exact_torch._run, "cpu", rows=64, copy_threads=2)
    images, mags = _inputs(150, seed=3, bad=(7,))
    images.flags.writeable = False  # a decoded partition is a read-only view of its bytes
    mags.flags.writeable = False
    small, _ = feed.predict(images[:10], mags[:10])  # allocates 10-row slots
    full, flagged = feed.predict(images, mags)       # grows them to 64
    np.testing.assert_allclose(small, full[:10], rtol=0, atol=1e-6)  # GEMMs of 10 and 64 rows
    assert flagged.tolist() == [7]
    empty, none = feed.predict(images[:0], mags[:0])
    assert empty.shape == (0,) and none.shape == (0,)
    np.testing.assert_allclose(full, exact_torch.predict(images, mags), rtol=0, atol=1e-6)


def test_predictor_routes_through_the_feed_when_it_has_one(exact_torch):
    """What a CUDA predictor does (its _feed is set when built for cuda), checked with a CPU feed."""
    pred = load_model("astromae-random", mode="exact", engine="torch", threads=1)
    assert pred._feed is None and pred.forward_rows is None  # CPU: the plain path
    images, mags = _inputs(90, seed=9, bad=(3, 88))
    want = pred.predict(images, mags, batch_size=32)
    pred._feed = DeviceFeed(pred._run, "cpu", rows=40)
    pred.set_forward_rows(25)
    assert pred.forward_rows == 25
    got = pred.predict(images, mags, batch_size=32)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    assert pred.last_flagged.tolist() == [3, 88] and pred._feed.stats.forwards == 4
    with pytest.raises(ModelError, match="forward rows must be >= 1"):
        pred.set_forward_rows(0)
    with pytest.raises(ModelError, match="batch_size must be >= 1"):
        pred.predict(images, mags, batch_size=0)


def test_feed_halves_its_forwards_on_out_of_memory(exact_torch):
    calls = []

    def runner(x, m):
        calls.append(len(x))
        if len(x) > 50:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return exact_torch._run(x, m)

    images, mags = _inputs(130, seed=4)
    feed = DeviceFeed(runner, "cpu", rows=200)
    got, _ = feed.predict(images, mags)
    assert feed.rows == 50 and feed.stats.oom_retries == 2 and calls[:2] == [130, 100]
    np.testing.assert_allclose(got, exact_torch.predict(images, mags), rtol=0, atol=1e-6)


class _FakeStream:
    def __init__(self, name, log):
        self.name, self.log = name, log

    def wait_event(self, event):
        self.log.append(("wait", self.name, event))

    def wait_stream(self, other):
        self.log.append(("wait_stream", self.name, other.name))


class _FakeEvent:
    def __init__(self, log):
        self.log = log

    def record(self, stream=None):
        self.log.append(("record", self, stream.name))

    def synchronize(self):
        self.log.append(("sync", self))


@pytest.fixture
def fake_cuda(monkeypatch):
    """The feed's CUDA branch run on CPU tensors: streams, events, device guards and graphs replaced by fakes
    that log what the feed asks of them (a captured 'graph' replays the step it recorded)."""
    import contextlib

    log: list = []
    capturing: list = []
    real_step = cuda_feed._step

    def recording_step(run, x, m):
        z, b = real_step(run, x, m)
        if capturing:
            capturing[-1].captured = (run, x, m, z, b)
        return z, b

    class FakeGraph:
        def replay(self):
            run, x, m, z, b = self.captured
            z2, b2 = real_step(run, x, m)
            z.copy_(z2)
            b.copy_(b2)
            log.append(("replay", x.shape[0]))

    @contextlib.contextmanager
    def graph(g, capture_error_mode=None):
        assert capture_error_mode == "thread_local"
        capturing.append(g)
        yield
        capturing.pop()

    compute = _FakeStream("compute", log)
    monkeypatch.setattr(cuda_feed, "_step", recording_step)
    monkeypatch.setattr(cuda_feed, "_host_empty", lambda shape, dtype, pin: torch.empty(shape, dtype=dtype))
    monkeypatch.setattr(torch.cuda, "Event", lambda *a, **k: _FakeEvent(log))
    monkeypatch.setattr(torch.cuda, "Stream", lambda *a, **k: _FakeStream("side", log))
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a: compute)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", graph)

    def make(runner, **kw):
        feed = DeviceFeed(runner, "cpu", **kw)
        feed.cuda = True                                   # take the CUDA branch, on CPU tensors
        feed.graphs = bool(kw.get("graphs"))
        feed.pad = kw.get("pad") or ("align" if feed.graphs else "none")
        feed._copy_stream = _FakeStream("copy", log)
        return feed

    return make, log


def test_feed_cuda_branch_orders_copies_and_forwards_with_events(fake_cuda, exact_torch):
    """Double buffering: before refilling a slot's pinned buffers the host waits for that slot's previous copy;
    the copy stream waits until the forward that read the slot is done; the compute stream waits for the copy;
    one host synchronisation at the end of the call, none per chunk on the compute stream."""
    make, log = fake_cuda
    images, mags = _inputs(300, seed=11, bad=(1, 200))
    feed = make(exact_torch._run, rows=64)
    got, flagged = feed.predict(images, mags)
    np.testing.assert_allclose(got, exact_torch.predict(images, mags), rtol=0, atol=1e-6)
    assert flagged.tolist() == [1, 200]
    slots = feed._slots
    want = []
    for i in range(5):  # 300 rows in chunks of 64
        s = slots[i % 2]
        want += [("sync", s.copied), ("wait", "copy", s.consumed), ("record", s.copied, "copy"),
                 ("wait", "compute", s.copied), ("record", s.consumed, "compute")]
    assert log[:-2] == want
    (_, done, stream), (kind, done2) = log[-2:]
    assert stream == "compute" and kind == "sync" and done2 is done and done not in {s.copied for s in slots}


def test_feed_cuda_graph_path_pads_captures_once_and_replays(fake_cuda, exact_torch, monkeypatch):
    make, log = fake_cuda
    monkeypatch.setattr(cuda_feed, "GRAPH_ALIGN", 32)  # small sizes, same logic (256 on a GPU)
    images, mags = _inputs(140, seed=12, bad=(0, 139))
    feed = make(exact_torch._run, rows=96, graphs=True)
    got, flagged = feed.predict(images, mags)           # chunks of 96 and 44 -> captured sizes 96 and 64
    np.testing.assert_allclose(got, exact_torch.predict(images, mags), rtol=0, atol=1e-6)
    assert flagged.tolist() == [0, 139]
    assert sorted(feed._graphs) == [64, 96] and feed.stats.captures == 2 and feed.stats.padded_rows == 20
    again, _ = feed.predict(images[:50], mags[:50])     # 50 -> padded to 64: replayed, not captured again
    np.testing.assert_allclose(again, got[:50], rtol=0, atol=1e-6)
    assert feed.stats.captures == 2 and [e for e in log if e[0] == "replay"] == [("replay", 96), ("replay", 64),
                                                                                   ("replay", 64)]
    # the padding rows of a replayed graph are zeros, not the previous chunk's rows
    _, static_x, static_m, _, _ = feed._graphs[64]
    assert not static_x[50:].any() and not static_m[50:].any()


def test_cuda_runner_precision_settings_on_cpu(monkeypatch):
    """cuda_runner switches TF32 off (exact means fp32); fast autocasts in fp16 unless told bf16."""
    model = load_model("astromae-random", mode="exact", engine="torch", threads=1)._run
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        exact = cuda_feed.cuda_runner(model, "exact")
        assert torch.backends.cuda.matmul.allow_tf32 is False and torch.backends.cudnn.allow_tf32 is False
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
    assert exact.dtype is None and not exact.compiled
    assert cuda_feed.cuda_runner(model, "fast").dtype is torch.float16
    monkeypatch.setenv("CAI_CUDA_FAST_DTYPE", "bfloat16")
    assert cuda_feed.cuda_runner(model, "fast").dtype is torch.bfloat16
    images, mags = _inputs(8, seed=1)
    with torch.inference_mode():
        x, m = torch.from_numpy(images), torch.from_numpy(mags)
        torch.testing.assert_close(exact(x, m), model(x, m), rtol=0, atol=0)


def test_cuda_is_refused_by_name_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ModelError, match=r"device 'cuda' is not available \(torch .* sees no CUDA GPU\)"):
        load_model("astromae-random", device="cuda", mode="fast")
    with pytest.raises(ModelError, match="device 'cuda:1' is not available"):
        load_model("astromae-random", device="cuda:1")


# --------------------------------------------------------------------------- one worker per GPU (local backend)

def test_gpu_assignment_pure():
    from cosmicai.backends.local import gpu_assignment

    assert gpu_assignment(4, "cpu", None, 0) is None
    assert gpu_assignment(1, "cuda", None, 4) is None                       # one worker: nothing to pin
    assert gpu_assignment(4, "cuda", None, 4) == ["0", "1", "2", "3"]
    assert gpu_assignment(2, "cuda", None, 4) == ["0", "1"]
    assert gpu_assignment(2, "cuda", "3,5", 2) == ["3", "5"]                # the parent's own selection
    assert gpu_assignment(2, "cuda", "GPU-aa, GPU-bb", 2) == ["GPU-aa", "GPU-bb"]
    assert gpu_assignment(1, "cuda:1", None, 2) is None
    with pytest.raises(ConfigError, match=r"--workers 3 with --device cuda: this host has 2 visible CUDA GPU\(s\) "
                                          r"\(CUDA_VISIBLE_DEVICES=3,5\).*use --workers 2 or fewer"):
        gpu_assignment(3, "cuda", "3,5", 2)
    with pytest.raises(ConfigError, match=r"device 'cuda:1' names one GPU, but 2 workers"):
        gpu_assignment(2, "cuda:1", None, 2)
    with pytest.raises(ConfigError, match="no CUDA GPU is visible"):
        gpu_assignment(1, "cuda", "", 0)


def _cuda_task(device: str = "cuda") -> dict:
    return {"rank": 0, "task": {"config": {"device": device}}}


def test_local_backend_sizes_cuda_runs_by_gpus(monkeypatch):
    from cosmicai.backends import local

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(local, "visible_gpus", lambda: 4)
    backend = local.LocalBackend()                       # workers default: the cores -> the GPUs on a CUDA run
    backend._setup_gpus("cuda")
    assert backend.workers == min(4, os.cpu_count() or 1) and backend.threads >= 1
    monkeypatch.setattr(local, "visible_gpus", lambda: 1)
    one = local.LocalBackend()
    seen = list(one.map(lambda **task: {"ran": task["rank"], "pid": os.getpid()}, [_cuda_task()]))
    assert one.workers == 1 and one.in_process and seen[0][1]["pid"] == os.getpid()  # one GPU: in this process
    with pytest.raises(ConfigError, match=r"--workers 2 with --device cuda: this host has 1 visible CUDA GPU"):
        list(local.LocalBackend(workers=2, threads=1).map(lambda **t: t, [_cuda_task(), _cuda_task()]))
    cpu = local.LocalBackend(workers=2, threads=1)       # CPU runs are unchanged
    assert cpu.workers == 2 and not cpu.in_process and cpu._gpus is None


def _report_gpu(rank: int, folder: str, task: dict | None = None) -> dict:
    """In a pool worker: note this process's CUDA_VISIBLE_DEVICES, wait until both workers have a task."""
    Path(folder, f"{os.getpid()}").write_text(os.environ.get("CUDA_VISIBLE_DEVICES", "unset"))
    deadline = time.time() + 60
    while len(list(Path(folder).iterdir())) < 2 and time.time() < deadline:
        time.sleep(0.05)
    return {"rank": rank, "pid": os.getpid(), "gpu": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "torch_imported_cuda": bool(sys.modules.get("torch") and sys.modules["torch"].cuda.is_initialized())}


def test_local_backend_pins_one_gpu_per_worker(monkeypatch, tmp_path):
    from cosmicai.backends import local

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    monkeypatch.setattr(local, "visible_gpus", lambda: 2)  # the parent "sees" two GPUs; the workers are real
    tasks = [{"rank": r, "folder": str(tmp_path), "task": {"config": {"device": "cuda"}}} for r in range(2)]
    with local.LocalBackend(workers=2, threads=1) as backend:
        results = [res for _, res in backend.map(_report_gpu, tasks)]
    assert all(isinstance(r, dict) for r in results), results
    assert len({r["pid"] for r in results}) == 2 and os.getpid() not in {r["pid"] for r in results}
    assert sorted(r["gpu"] for r in results) == ["3", "5"]      # each worker its own GPU, set before any task
    assert not any(r["torch_imported_cuda"] for r in results)


# --------------------------------------------------------------------------- the benchmark, end to end on CPU

BLOCKER = '''
import importlib.abc, importlib.machinery, sys
BLOCKED = {"galsim", "astropy", "dask", "distributed", "dask_jobqueue", "boto3", "botocore", "s3fs",
           "aiobotocore", "yaml", "onnx", "scipy", "h5py", "matplotlib"}
class _Absent(importlib.abc.Loader):
    def create_module(self, spec):
        raise ModuleNotFoundError(f"No module named {spec.name!r} (not on the GPU machine; blocked by the test)",
                                  name=spec.name)
    def exec_module(self, module):
        pass
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            return importlib.machinery.ModuleSpec(name, _Absent(), origin=None)
        return None
sys.meta_path.insert(0, _Block())
'''


def test_gpu_speed_benchmark_cpu_smoke(tmp_path):
    """The benchmark runs end to end (model-only table, synthetic dataset replicated, `cai run` in a
    subprocess, stage table) with the packages the GPU machine lacks made unimportable."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCKER)
    path = os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env = {**os.environ, "PYTHONPATH": path}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_speed.py"), "--cpu-smoke",
                           "--workdir", str(tmp_path / "work"), "--json", str(tmp_path / "out.json")],
                          capture_output=True, text=True, env=env, timeout=120)
    took = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    for text in ("(a) model only", "authors' GPU loop", "exact (ours)", "fast (ours)", "(b) whole dataset",
                 "map stage", "galaxies/s", "heavy modules imported: none"):
        assert text in out, out
    report = json.loads((tmp_path / "out.json").read_text())
    assert report["device"] == "cpu" and report["b"]["runs"], report
    run = report["b"]["runs"][0]
    assert run["rows_out"] == report["b"]["galaxies"] and run["rc"] == 0
    assert set(report["a"]["methods"]) >= {"authors' GPU loop (inference.py)", "exact (ours)", "fast (ours)"}
    assert took < 60, f"smoke run took {took:.0f} s"


def test_gpu_speed_nvidia_smi_sampler(tmp_path, monkeypatch):
    """GPU busy time in (b): nvidia-smi polled in the background (a stand-in prints utilisation, memory)."""
    fake = tmp_path / "bin" / "nvidia-smi"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\nfor i in 1 2 3 4 5 6 7 8 9 10; do echo \"50, 2048\"; sleep 0.02; done\n"
                    "echo 'oops'\nexec sleep 30\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_speed", ROOT / "benchmarks" / "gpu_speed.py")
    gpu_speed = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_speed)

    sampler = gpu_speed.GpuSampler(interval=0.1)
    assert sampler.start()
    time.sleep(1.0)
    got = sampler.stop()
    assert got["samples"] == 10 and got["mean_util_pct"] == 50 and got["peak_memory_mib"] == 2048
    assert got["busy_s"] == pytest.approx(0.5)
    assert gpu_speed.parse_size("256MB") == 256 << 20 and gpu_speed.parse_size("2GB") == 2 << 30
