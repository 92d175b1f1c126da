"""Recommend partition size, Lambda memory and Map concurrency for a dataset, by simulating each option.

Every (partition size, memory, MaxConcurrency) combination is simulated with the calibrated
:mod:`cosmicai.analysis.simulate` model; options whose working set does not fit in memory or whose
longest task exceeds Lambda's 15-minute limit are marked infeasible. The goal ``time`` picks the
fastest option, ``cost`` the cheapest (optionally finishing within ``max_time_s``); among options within
1% of the best on the goal, the best on the other axis wins.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

from ..errors import ConfigError
from .simulate import (DEFAULT_PARAMS, LAMBDA_TIMEOUT_S, MAP_MAX_CHILDREN, MAX_MEMORY_MB, MIB, MIN_MEMORY_MB,
                       Params, Workload, lambda_vcpus, simulate)

DEFAULT_PARTITIONS_MB: tuple[float, ...] = (25, 50, 100, 200, 400)
DEFAULT_MEMORY_MB: tuple[int, ...] = (2048, 3008, 4096, 6144, 8192, 10240)
DEFAULT_CONCURRENCY: tuple[int, ...] = (250, 500, 1000)
#: Working-set estimate of one inference task: Python + torch + the model (MB) plus this many times the
#: partition's size (the fetched bytes, the decoded arrays and the float32 model inputs).
RUNTIME_MB = 700.0
PARTITION_MEMORY_FACTOR = 3.0
#: Options within this fraction of the best on the goal count as tied; the other axis decides.
TIE = 0.01
#: The original CAI configuration, simulated beside the options at the same data size.
ORIGINAL = {"partition_mb": 25.0, "memory_mb": 10_240, "max_concurrency": MAP_MAX_CHILDREN}


@dataclass(frozen=True)
class Option:
    """One simulated configuration."""

    partition_mb: float
    memory_mb: int
    max_concurrency: int
    ranks: int
    map_s: float
    total_s: float
    cost_usd: float
    peak_concurrency: int
    cold_starts: int
    longest_task_s: float
    feasible: bool
    reason: str = ""


@dataclass
class PlanResult:
    """All options, the recommendation and the original configuration at the same size."""

    data_bytes: int
    goal: str
    per_sample_s: float
    options: list[Option]
    recommended: Option | None
    original: Option
    params: Params = field(repr=False, default=DEFAULT_PARAMS)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"data_bytes": self.data_bytes, "goal": self.goal, "per_sample_s": self.per_sample_s,
                "recommended": asdict(self.recommended) if self.recommended else None,
                "original": asdict(self.original), "options": [asdict(o) for o in self.options],
                "params": asdict(self.params)}


def memory_needed_mb(partition_mb: float) -> float:
    """Estimated peak memory of a task over one partition of ``partition_mb``."""
    return RUNTIME_MB + PARTITION_MEMORY_FACTOR * partition_mb


def speed_params(params: Params = DEFAULT_PARAMS, samples_per_sec: float | None = None,
                 measured_vcpus: float = 6.0, speedup: float = 1.0) -> Params:
    """``params`` with the per-sample time replaced by a measured speed.

    ``samples_per_sec`` is one worker's measured throughput on ``measured_vcpus`` cores; it is moved to
    the reference memory's vCPU share with the thread-scaling exponent. Without it the calibrated
    per-sample time is kept. ``speedup`` then divides the per-sample time (e.g. our code vs the original).
    """
    per_sample = params.per_sample_s
    if samples_per_sec is not None:
        if not samples_per_sec > 0 or not math.isfinite(samples_per_sec):
            raise ConfigError(f"samples_per_sec: must be a positive number, got {samples_per_sec!r}")
        if not measured_vcpus > 0:
            raise ConfigError(f"measured_vcpus: must be positive, got {measured_vcpus!r}")
        ref_vcpus = lambda_vcpus(params.ref_memory_mb)
        per_sample = (1.0 / samples_per_sec) * (measured_vcpus / ref_vcpus) ** params.thread_scaling
    if not speedup > 0 or not math.isfinite(speedup):
        raise ConfigError(f"speedup: must be a positive number, got {speedup!r}")
    return params.with_(per_sample_s=per_sample / speedup)


def evaluate(data_bytes: int, partition_mb: float, memory_mb: int, max_concurrency: int,
             params: Params = DEFAULT_PARAMS, seeds: Sequence[int] = (0,), arch: str = "x86_64") -> Option:
    """Simulate one configuration (mean over ``seeds``) and check it against Lambda's limits."""
    workload = Workload(data_bytes=data_bytes, partition_bytes=int(round(partition_mb * MIB)),
                        memory_mb=memory_mb, max_concurrency=max_concurrency, arch=arch)
    sims = [simulate(workload, params, seed=s, keep_timeline=False) for s in seeds]
    n = len(sims)
    longest = max(r.longest_task_s for r in sims)
    reasons = []
    if memory_needed_mb(partition_mb) > memory_mb:
        reasons.append(f"needs ~{memory_needed_mb(partition_mb):.0f} MB")
    if longest > LAMBDA_TIMEOUT_S:
        reasons.append(f"a task runs {longest:.0f} s > {LAMBDA_TIMEOUT_S:.0f} s limit")
    return Option(partition_mb=partition_mb, memory_mb=memory_mb, max_concurrency=max_concurrency,
                  ranks=workload.ranks, map_s=sum(r.map_s for r in sims) / n,
                  total_s=sum(r.total_s for r in sims) / n, cost_usd=sum(r.cost["total"] for r in sims) / n,
                  peak_concurrency=max(r.peak_concurrency for r in sims),
                  cold_starts=round(sum(r.cold_starts for r in sims) / n), longest_task_s=longest,
                  feasible=not reasons, reason="; ".join(reasons))


def _check_options(partitions: Sequence[float], memories: Sequence[int], concurrencies: Sequence[int]) -> None:
    if not partitions or not memories or not concurrencies:
        raise ConfigError("planner: partition, memory and concurrency options must each list at least one value")
    for m in memories:
        if not (MIN_MEMORY_MB <= m <= MAX_MEMORY_MB):
            raise ConfigError(f"memory option {m}: Lambda memory must be {MIN_MEMORY_MB}-{MAX_MEMORY_MB} MB")
    for c in concurrencies:
        if not (1 <= c <= MAP_MAX_CHILDREN):
            raise ConfigError(f"concurrency option {c}: must be 1-{MAP_MAX_CHILDREN}")
    for p in partitions:
        if not p > 0:
            raise ConfigError(f"partition option {p}: must be a positive size in MB")


def plan(data_bytes: int, goal: str = "time", params: Params = DEFAULT_PARAMS,
         partitions_mb: Sequence[float] = DEFAULT_PARTITIONS_MB, memory_mb: Sequence[int] = DEFAULT_MEMORY_MB,
         concurrency: Sequence[int] = DEFAULT_CONCURRENCY, max_time_s: float | None = None,
         seeds: Sequence[int] = (0,), arch: str = "x86_64") -> PlanResult:
    """Simulate every option for ``data_bytes`` and pick the best for ``goal`` ("time" or "cost")."""
    if goal not in ("time", "cost"):
        raise ConfigError(f"goal: expected 'time' or 'cost', got {goal!r}")
    if isinstance(data_bytes, bool) or not isinstance(data_bytes, int) or data_bytes <= 0:
        raise ConfigError(f"data size: must be a positive number of bytes, got {data_bytes!r}")
    _check_options(partitions_mb, memory_mb, concurrency)
    options = [evaluate(data_bytes, p, m, c, params, seeds, arch)
               for p in partitions_mb for m in memory_mb for c in concurrency]
    ok = [o for o in options if o.feasible and (goal == "time" or max_time_s is None or o.total_s <= max_time_s)]
    recommended = None
    if ok:
        # within 1% of the best on the goal, take the best on the other axis
        if goal == "time":
            best = min(o.total_s for o in ok)
            tied = [o for o in ok if o.total_s <= best * (1 + TIE)]
            recommended = min(tied, key=lambda o: (o.cost_usd, o.total_s))
        else:
            best = min(o.cost_usd for o in ok)
            tied = [o for o in ok if o.cost_usd <= best * (1 + TIE)]
            recommended = min(tied, key=lambda o: (o.total_s, o.cost_usd))
    primary = (lambda o: o.total_s) if goal == "time" else (lambda o: o.cost_usd)
    options.sort(key=lambda o: (o is not recommended, o not in ok, primary(o)))
    original = evaluate(data_bytes, ORIGINAL["partition_mb"], ORIGINAL["memory_mb"],
                        ORIGINAL["max_concurrency"], params, seeds, arch)
    return PlanResult(data_bytes=data_bytes, goal=goal, per_sample_s=params.per_sample_s, options=options,
                      recommended=recommended, original=original, params=params)


def format_plan(result: PlanResult, top: int = 10) -> str:
    """Human-readable table of the best ``top`` options plus the recommendation and the original."""
    head = (f"{'':2}{'part MB':>7} {'memory':>6} {'max conc':>8} {'ranks':>6} {'map s':>7} {'total s':>7} "
            f"{'cost $':>8} {'peak':>5} {'cold':>5}  note")

    def line(o: Option, mark: str = "") -> str:
        return (f"{mark:2}{o.partition_mb:>7g} {o.memory_mb:>6} {o.max_concurrency:>8} {o.ranks:>6} "
                f"{o.map_s:>7.1f} {o.total_s:>7.1f} {o.cost_usd:>8.3f} {o.peak_concurrency:>5} "
                f"{o.cold_starts:>5}  {o.reason}")

    gib = result.data_bytes / 1024**3
    out = [f"plan for {gib:.4g} GB (goal: {result.goal}; {result.per_sample_s * 1e3:.2f} ms/sample at "
           f"{result.params.ref_memory_mb:.0f} MB; account concurrency {result.params.account_concurrency})",
           head]
    out += [line(o, "*" if o is result.recommended else "") for o in result.options[:top]]
    if result.recommended is None:
        out.append("no feasible option: widen the memory/partition/concurrency options")
    else:
        r = result.recommended
        out.append(f"recommended: {r.partition_mb:g} MB partitions, {r.memory_mb} MB memory, MaxConcurrency "
                   f"{r.max_concurrency} -> {r.total_s:.1f} s, ${r.cost_usd:.3f}")
    o = result.original
    out.append(f"original config (25 MB, 10240 MB, no MaxConcurrency) simulated: {o.total_s:.1f} s, "
               f"${o.cost_usd:.3f}, {o.ranks} ranks")
    return "\n".join(out)
