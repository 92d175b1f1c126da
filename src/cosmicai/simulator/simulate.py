"""Discrete-event model of an AWS Step Functions Distributed Map fanning partitions out over Lambda.

One execution is ``Initialize -> Distributed Map (one child per rank) -> Summarize``. The Map starts
child executions at ``launch_rate`` per second while fewer than ``max_concurrency`` children run. Each
child invokes the inference function; Lambda serves it from an idle (warm) execution environment, else
creates a new one (cold start: image init + model load) if the in-flight count is below the account
concurrency limit and the burst scaling allowance (``burst_step`` more environments every
``burst_interval_s``); else the invocation is throttled and retried when capacity frees. A task then
fetches its partition from S3 at a per-function bandwidth, decodes and predicts it (seconds per sample
scaled by the vCPU share of the memory size), and writes its results. Per-task durations carry seeded
lognormal jitter and occasional stragglers, so a seed gives one exact, repeatable timeline.

See docs/simulator.md for the parameters, where each default comes from, and the calibration.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from ..analysis.cost import lambda_cost
from ..data.formats import LEGACY_SAMPLE_BYTES
from ..errors import ConfigError
# the Lambda / Step Functions service limits the model obeys
from ..lambda_limits import (LAMBDA_ACCOUNT_CONCURRENCY, LAMBDA_BURST_INTERVAL_S, LAMBDA_BURST_STEP,
                             MAP_MAX_CHILDREN, MAX_MEMORY_MB, MAX_VCPUS, MB_PER_VCPU, MIN_MEMORY_MB)

MIB = 1024**2


def lambda_vcpus(memory_mb: float) -> float:
    """The vCPU share of a Lambda function with ``memory_mb``: memory / 1,769 MB up to 5 vCPUs (8,845 MB),
    then linear to 6 vCPUs at 10,240 MB (continuous and increasing)."""
    five = 5 * MB_PER_VCPU
    if memory_mb <= five:
        return max(memory_mb, 1.0) / MB_PER_VCPU
    return min(MAX_VCPUS, 5.0 + (memory_mb - five) / (MAX_MEMORY_MB - five))


@dataclass(frozen=True)
class Params:
    """Model parameters. The service limits are AWS's documented defaults; the rest are fitted on the
    published CAI runs by ``python -m cosmicai.simulator.calibrate --fit`` (see docs/simulator.md)."""

    # --- AWS service behaviour (documented quotas, not fitted)
    account_concurrency: int = LAMBDA_ACCOUNT_CONCURRENCY
    burst_step: int = LAMBDA_BURST_STEP
    burst_interval_s: float = LAMBDA_BURST_INTERVAL_S
    retry_delay_s: float = 1.0
    # --- fitted on the published runs (calibrate --fit --seeds 2; docs/simulator.md)
    launch_rate: float = 74.3254        # child executions the Map starts per second at first ...
    launch_doubling_s: float = 13.4543  # ... doubling every this many seconds (0: a constant rate) ...
    launch_rate_max: float = 1000.0     # ... up to this rate
    init_base_s: float = 12.0           # Initialize stage (its own cold start, listing, plan)
    cold_start_s: float = 2.0           # new environment: container init + imports + model load
    per_sample_s: float = 0.0021        # decode + inference seconds per sample at ref_memory_mb
    summarize_base_s: float = 4.24264
    summarize_per_rank_s: float = 0.0025
    # --- from the published per-rank records (calibrate.record_shape)
    jitter_sigma: float = 0.0970        # lognormal sigma of per-task durations
    straggler_prob: float = 0.0365      # share of tasks slower than twice their run's median ...
    straggler_factor: float = 3.513     # ... by this factor (median)
    # --- documented assumptions (not identifiable from the published runs)
    ref_memory_mb: float = float(MAX_MEMORY_MB)  # memory at which per_sample_s holds (the original's)
    thread_scaling: float = 0.8         # per-sample time ~ vcpus ** -thread_scaling
    fetch_mbps: float = 90.0            # per-function S3 GET bandwidth
    fetch_latency_s: float = 0.05
    write_s: float = 0.3                # writing one rank's record and predictions
    control_memory_mb: float = 1024.0   # memory of the Initialize and Summarize functions

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise ConfigError(f"simulator parameter {name}: must be a finite number, got {value!r}")
            if value < 0:
                raise ConfigError(f"simulator parameter {name}: must be >= 0, got {value!r}")
        for name in ("launch_rate", "launch_rate_max", "account_concurrency", "burst_step",
                     "burst_interval_s", "fetch_mbps", "ref_memory_mb", "control_memory_mb"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"simulator parameter {name}: must be > 0, got {getattr(self, name)!r}")
        if self.straggler_prob > 1:
            raise ConfigError(f"simulator parameter straggler_prob: must be in [0, 1], got {self.straggler_prob!r}")

    def per_sample_at(self, memory_mb: float) -> float:
        """Seconds per sample at ``memory_mb``: per_sample_s scaled by the vCPU share."""
        ratio = lambda_vcpus(self.ref_memory_mb) / lambda_vcpus(memory_mb)
        return self.per_sample_s * ratio ** self.thread_scaling

    def with_(self, **changes: Any) -> "Params":
        """A copy with ``changes`` applied (unknown names raise ConfigError)."""
        unknown = set(changes) - set(asdict(self))
        if unknown:
            raise ConfigError(f"simulator parameters: unknown name(s) {sorted(unknown)}")
        return replace(self, **changes)


DEFAULT_PARAMS = Params()


@dataclass(frozen=True)
class Workload:
    """What is run: data size, partition size, function memory and the Map's MaxConcurrency."""

    data_bytes: int
    partition_bytes: int
    memory_mb: float = float(MAX_MEMORY_MB)
    max_concurrency: int = MAP_MAX_CHILDREN
    bytes_per_sample: int = LEGACY_SAMPLE_BYTES
    arch: str = "x86_64"

    def __post_init__(self) -> None:
        for name in ("data_bytes", "partition_bytes", "bytes_per_sample", "max_concurrency"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"workload {name}: must be a positive integer, got {value!r}")
        if not (MIN_MEMORY_MB <= self.memory_mb <= MAX_MEMORY_MB):
            raise ConfigError(f"workload memory_mb: Lambda memory must be {MIN_MEMORY_MB}-{MAX_MEMORY_MB} MB, "
                              f"got {self.memory_mb!r}")
        if self.max_concurrency > MAP_MAX_CHILDREN:
            raise ConfigError(f"workload max_concurrency: a Distributed Map runs at most {MAP_MAX_CHILDREN} "
                              f"children at once, got {self.max_concurrency}")
        if self.partition_bytes < self.bytes_per_sample:
            raise ConfigError(f"workload partition_bytes: {self.partition_bytes} bytes holds no sample of "
                              f"{self.bytes_per_sample} bytes")

    @property
    def samples_per_partition(self) -> int:
        """Samples in a full partition (the original rounds a partition up to whole samples)."""
        return math.ceil(self.partition_bytes / self.bytes_per_sample)

    @property
    def ranks(self) -> int:
        """Number of partitions, hence of Map children (one partition per rank): ceil(data / partition)."""
        return math.ceil(self.data_bytes / self.partition_bytes)

    def partition_samples(self) -> np.ndarray:
        """Samples in each rank's partition; the last one holds the remainder."""
        counts = np.full(self.ranks, self.samples_per_partition, dtype=np.int64)
        rest = self.data_bytes - (self.ranks - 1) * self.partition_bytes
        counts[-1] = max(1, math.ceil(rest / self.bytes_per_sample))
        return counts

    @property
    def samples(self) -> int:
        """Samples in the whole dataset."""
        return int(self.partition_samples().sum())


@dataclass(frozen=True)
class TaskSpan:
    """One rank's invocation: times in seconds from the execution start."""

    rank: int
    launch: float       # the Map started the child
    start: float        # the invocation began running (after any throttling)
    end: float
    env: int            # execution environment id
    cold: bool
    billed_s: float


@dataclass
class SimResult:
    """Predicted phases, cost and timeline of one execution."""

    workload: Workload
    params: Params
    seed: int
    ranks: int
    init_s: float
    map_s: float
    summarize_s: float
    total_s: float
    peak_concurrency: int
    cold_starts: int
    throttled: int
    environments: int
    billed_seconds: float
    longest_task_s: float
    cost: dict[str, Any]
    timeline: list[TaskSpan] = field(default_factory=list, repr=False)

    def to_dict(self, timeline: bool = False) -> dict[str, Any]:
        """JSON-ready summary (``timeline=True`` adds one entry per task)."""
        out = {k: getattr(self, k) for k in ("seed", "ranks", "init_s", "map_s", "summarize_s", "total_s",
                                             "peak_concurrency", "cold_starts", "throttled", "environments",
                                             "billed_seconds", "longest_task_s")}
        out["workload"] = asdict(self.workload)
        out["params"] = asdict(self.params)
        out["cost"] = {k: v for k, v in self.cost.items()}
        if timeline:
            out["timeline"] = [asdict(t) for t in self.timeline]
        return out


def _stream(seed: int, k: int) -> np.random.Generator:
    # One independent stream per quantity, so a task's draws do not depend on how many tasks there are.
    return np.random.default_rng([seed, k])


def task_durations(workload: Workload, params: Params, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-rank (warm run seconds, extra cold-start seconds) with the seed's jitter and stragglers."""
    n = workload.ranks
    samples = workload.partition_samples()
    fetch = params.fetch_latency_s + samples * workload.bytes_per_sample / MIB / params.fetch_mbps
    compute = samples * params.per_sample_at(workload.memory_mb)
    jitter = _stream(seed, 1).lognormal(0.0, params.jitter_sigma, n) if params.jitter_sigma > 0 else np.ones(n)
    straggle = np.where(_stream(seed, 2).random(n) < params.straggler_prob, params.straggler_factor, 1.0)
    warm = (fetch + compute) * jitter * straggle + params.write_s
    cold_jitter = _stream(seed, 3).lognormal(0.0, params.jitter_sigma, n) if params.jitter_sigma > 0 else np.ones(n)
    return warm, params.cold_start_s * cold_jitter


class _MapRun:
    """The event loop of one Map stage; times are seconds from the execution start."""

    LAUNCH, FINISH, CAPACITY = 0, 1, 2

    def __init__(self, workload: Workload, params: Params, warm: np.ndarray, cold: np.ndarray, start: float):
        self.w, self.p, self.warm, self.cold = workload, params, warm, cold
        self.n = len(warm)
        self.events: list[tuple[float, int, int, int]] = []
        self.seq = 0
        self.next_item = 0
        self.children = 0            # Map children running (including throttled ones waiting to retry)
        self.in_flight = 0           # Lambda invocations running or holding a reserved slot
        self.peak = 0
        self.idle: list[int] = []    # warm environments, most recently used last
        self.n_envs = 0
        self.first_invoke: float | None = None
        self.waiting: deque[int] = deque()
        self.capacity_event = False
        self.launch_pending = False
        self.last_launch = -math.inf
        self.throttled = 0
        self.launch_t = np.zeros(self.n)
        self.spans: list[TaskSpan | None] = [None] * self.n
        self.map_start = start
        self._push(start, self.LAUNCH, -1)
        self.launch_pending = True

    def _push(self, t: float, kind: int, item: int) -> None:
        self.seq += 1
        heapq.heappush(self.events, (t, self.seq, kind, item))

    def _launch_rate(self, t: float) -> float:
        if self.p.launch_doubling_s <= 0:
            return min(self.p.launch_rate_max, self.p.launch_rate)
        doublings = min(60.0, max(0.0, t - self.map_start) / self.p.launch_doubling_s)
        return min(self.p.launch_rate_max, self.p.launch_rate * 2.0 ** doublings)

    def _cap(self, t: float) -> int:
        if self.first_invoke is None:
            steps = 0
        else:
            steps = int((t - self.first_invoke) // self.p.burst_interval_s + 1e-9)
        return int(min(self.p.account_concurrency, self.p.burst_step * (1 + steps)))

    def _start(self, rank: int, t: float) -> None:
        if self.first_invoke is None:
            self.first_invoke = t
        if self.idle:
            env, cold = self.idle.pop(), False
        else:
            env, cold = self.n_envs, True
            self.n_envs += 1
        run = float(self.warm[rank] + (self.cold[rank] if cold else 0.0))
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        self.spans[rank] = TaskSpan(rank, float(self.launch_t[rank]), t, t + run, env, cold, run)
        self._push(t + run, self.FINISH, rank)

    def _invoke(self, rank: int, t: float) -> None:
        if not self.waiting and self.in_flight < self._cap(t):
            self._start(rank, t)
            return
        self.throttled += 1
        self.waiting.append(rank)
        self._schedule_capacity(t)

    def _schedule_capacity(self, t: float) -> None:
        # A throttled invocation can also proceed when burst scaling allows more environments.
        if self.capacity_event or not self.waiting or self.first_invoke is None:
            return
        if self._cap(t) >= self.p.account_concurrency:
            return
        steps = int((t - self.first_invoke) // self.p.burst_interval_s + 1e-9) + 1
        self._push(self.first_invoke + steps * self.p.burst_interval_s, self.CAPACITY, -1)
        self.capacity_event = True

    def _serve_waiting(self, t: float) -> None:
        while self.waiting and self.in_flight < self._cap(t):
            rank = self.waiting.popleft()
            # the slot is taken now; the retry lands after the retry delay
            self._start(rank, t + self.p.retry_delay_s)
        self._schedule_capacity(t)

    def _maybe_launch(self, t: float) -> None:
        if self.launch_pending or self.next_item >= self.n or self.children >= self.w.max_concurrency:
            return
        self._push(max(t, self.last_launch + 1.0 / self._launch_rate(self.last_launch)), self.LAUNCH, -1)
        self.launch_pending = True

    def run(self) -> list[TaskSpan]:
        while self.events:
            t, _, kind, item = heapq.heappop(self.events)
            if kind == self.LAUNCH:
                self.launch_pending = False
                if self.next_item < self.n and self.children < self.w.max_concurrency:
                    rank = self.next_item
                    self.next_item += 1
                    self.children += 1
                    self.last_launch = t
                    self.launch_t[rank] = t
                    self._invoke(rank, t)
                self._maybe_launch(t)
            elif kind == self.FINISH:
                span = self.spans[item]
                self.in_flight -= 1
                self.children -= 1
                self.idle.append(span.env)
                self._serve_waiting(t)
                self._maybe_launch(t)
            else:
                self.capacity_event = False
                self._serve_waiting(t)
        return [s for s in self.spans if s is not None]


def simulate(workload: Workload, params: Params = DEFAULT_PARAMS, seed: int = 0,
             keep_timeline: bool = True) -> SimResult:
    """Simulate one execution of ``workload``; the same seed gives the same result."""
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ConfigError(f"seed: must be a non-negative integer, got {seed!r}")
    warm, cold = task_durations(workload, params, seed)
    init_s = params.init_base_s
    runner = _MapRun(workload, params, warm, cold, init_s)
    spans = runner.run()
    map_end = max(s.end for s in spans)
    map_s = map_end - init_s
    summarize_s = params.summarize_base_s + params.summarize_per_rank_s * workload.ranks
    billed = [s.billed_s for s in spans]
    map_cost = lambda_cost(len(spans), billed, workload.memory_mb, arch=workload.arch)
    control_cost = lambda_cost(2, [init_s, summarize_s], params.control_memory_mb, arch=workload.arch)
    cost = {"total": map_cost["total"] + control_cost["total"], "map": map_cost, "control": control_cost}
    return SimResult(
        workload=workload, params=params, seed=seed, ranks=workload.ranks, init_s=init_s, map_s=map_s,
        summarize_s=summarize_s, total_s=init_s + map_s + summarize_s,
        peak_concurrency=max_overlap(spans), cold_starts=sum(s.cold for s in spans),
        throttled=runner.throttled, environments=len({s.env for s in spans}),
        billed_seconds=math.fsum(billed), longest_task_s=max(billed), cost=cost,
        timeline=spans if keep_timeline else [])


def max_overlap(spans: list[TaskSpan]) -> int:
    """Most invocations running at the same instant."""
    edges = sorted([(s.start, 1) for s in spans] + [(s.end, -1) for s in spans], key=lambda e: (e[0], e[1]))
    best = cur = 0
    for _, d in edges:
        cur += d
        best = max(best, cur)
    return best

