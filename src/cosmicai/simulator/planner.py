"""Recommend partition size, Lambda memory and Map concurrency for a dataset, by simulating each option.

Every (partition size, memory, MaxConcurrency) combination is simulated with the calibrated
:mod:`cosmicai.simulator.simulate` model; options whose working set does not fit in memory or whose
longest task exceeds Lambda's 15-minute limit are marked infeasible. The goal ``time`` picks the
fastest option, ``cost`` the cheapest (optionally finishing within ``max_time_s``); among options within
1% of the best on the goal, the best on the other axis wins.

The cold start and per-sample speed simulated come from one of two *bases*: ``original_basis`` (the
constants fitted on the original CAI's published runs) or ``worker_basis`` (our worker's measured cold
start and per-galaxy speed, from a worker profile JSON written by ``benchmarks/cold_start.py`` or from
explicit values). Each returns the simulator parameters and a :class:`SpeedBasis` saying which numbers were
used and where they came from; ``compare`` simulates the same configurations under both.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..errors import ConfigError
from ..lambda_limits import LAMBDA_TIMEOUT_S, MAP_MAX_CHILDREN, MAX_MEMORY_MB, MIN_MEMORY_MB
from .simulate import DEFAULT_PARAMS, MIB, Params, Workload, lambda_vcpus, simulate

DEFAULT_PARTITIONS_MB: tuple[float, ...] = (25, 50, 100, 200, 400)
DEFAULT_MEMORY_MB: tuple[int, ...] = (2048, 3008, 4096, 6144, 8192, MAX_MEMORY_MB)
DEFAULT_CONCURRENCY: tuple[int, ...] = (250, 500, 1000)
#: Working-set estimate of one inference task: Python + torch + the model (MB) plus this many times the
#: partition's size (the fetched bytes, the decoded arrays and the float32 model inputs).
RUNTIME_MB = 700.0
PARTITION_MEMORY_FACTOR = 3.0
#: Options within this fraction of the best on the goal count as tied; the other axis decides.
TIE = 0.01
#: The original CAI configuration, simulated beside the options at the same data size.
ORIGINAL = {"partition_mb": 25.0, "memory_mb": MAX_MEMORY_MB, "max_concurrency": MAP_MAX_CHILDREN}
#: Partition sizes (MB) of the original-vs-our-worker comparison (``cai plan --compare-original``).
COMPARE_PARTITIONS_MB: tuple[float, ...] = (5, 10, 25)

#: The worker profile format written by ``benchmarks/cold_start.py --profile-out``.
PROFILE_SCHEMA = "cosmicai.worker-profile/1"
#: Fields a worker profile must hold, each a positive number.
PROFILE_REQUIRED = ("cold_start_s", "per_galaxy_s", "threads")
#: The profile shipped with the package (``cai plan``'s default).
DEFAULT_WORKER_PROFILE = Path(__file__).resolve().with_name("worker_profile.json")
#: Seconds a new Lambda environment spends before any of our code runs: sandbox creation, loading the
#: container image and bootstrapping the Python runtime. An assumption (typical for a container image of a
#: few hundred MB since Lambda's lazy image loading); the original's published runs cannot separate it
#: from imports and model load. Added to a worker's measured process cold start.
PLATFORM_COLD_S = 0.5


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


@dataclass(frozen=True)
class WorkerProfile:
    """Measured numbers of our worker (``cosmicai.worker-profile/1``): the required fields, plus the
    whole file in ``data`` (extra keys kept)."""

    path: str
    cold_start_s: float     # process start -> first prediction (imports + model load + first batch)
    per_galaxy_s: float     # steady-state seconds per galaxy of one process on ``threads`` CPU threads
    threads: float
    data: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def measured_with(self) -> str | None:
        """How the numbers were measured (the profile's ``measured_with``), if it says."""
        value = self.data.get("measured_with")
        return None if value is None else str(value)

    @property
    def date(self) -> str | None:
        """When the numbers were measured (the profile's ``date``), if it says."""
        value = self.data.get("date")
        return None if value is None else str(value)

    def summary(self) -> dict[str, Any]:
        """The profile's identifying fields, for a plan's provenance."""
        out: dict[str, Any] = {"path": self.path,
                               "shipped": Path(self.path).resolve() == DEFAULT_WORKER_PROFILE}
        for key in ("schema", "install", "engine", "mode", "threads", "measured_with", "date", "machine"):
            if key in self.data:
                out[key] = self.data[key]
        return out


def load_worker_profile(path: str | os.PathLike | None = None) -> WorkerProfile:
    """Read and check a worker profile (default: the shipped ``worker_profile.json``).

    Raises ConfigError naming the file and the field for a missing file, invalid JSON, a wrong ``schema``,
    or a required field (``cold_start_s``, ``per_galaxy_s``, ``threads``) that is missing, not a number,
    not finite or not positive. Keys beyond the schema's are accepted and kept.
    """
    p = Path(path) if path is not None else DEFAULT_WORKER_PROFILE
    where = f"worker profile {p}"
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{where}: file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{where}: cannot read it ({exc})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{where}: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a JSON object, got {type(data).__name__}")
    if "schema" not in data:
        raise ConfigError(f"{where}: missing required field 'schema' (expected {PROFILE_SCHEMA!r})")
    if data["schema"] != PROFILE_SCHEMA:
        raise ConfigError(f"{where}: field 'schema' must be {PROFILE_SCHEMA!r}, got {data['schema']!r}")
    values = {}
    for name in PROFILE_REQUIRED:
        if name not in data:
            raise ConfigError(f"{where}: missing required field {name!r}")
        value = data[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or value <= 0:
            raise ConfigError(f"{where}: field {name!r} must be a positive number, got {value!r}")
        values[name] = float(value)
    return WorkerProfile(path=str(p), data=data, **values)


@dataclass(frozen=True)
class SpeedBasis:
    """The cold start and per-sample speed a plan simulates, and where each came from.

    ``cold_start_s`` is the simulator's: the extra seconds a new environment's first task takes. For the
    ``worker`` basis it is ``platform_cold_s`` (Lambda's sandbox + image + runtime, an assumption) plus
    ``process_cold_s`` (our process start -> first prediction, measured); for the ``original`` basis it is
    the fitted constant, which cannot be split. ``per_sample_s`` is at the reference memory (10,240 MB).
    """

    name: str                           # "worker" (our worker) or "original" (the original's constants)
    cold_start_s: float
    cold_start_from: str
    per_sample_s: float
    speed_from: str
    platform_cold_s: float | None = None
    platform_cold_from: str | None = None
    process_cold_s: float | None = None
    process_cold_from: str | None = None
    per_galaxy_s: float | None = None   # as measured (before the vCPU move and the speedup)
    measured_vcpus: float | None = None
    speedup: float = 1.0
    profile: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)

    def describe(self, params: Params, others: bool = True) -> list[str]:
        """Lines saying which numbers were used and where they came from (``others``: add a line saying
        that every other parameter is the fitted one)."""
        title = "our worker" if self.name == "worker" else "the original's fitted constants"
        out = [f"numbers used ({title}):"]
        if self.platform_cold_s is not None and self.process_cold_s is not None:
            out.append(f"  cold start {self.cold_start_s:.2f} s = {self.platform_cold_s:.2f} s Lambda platform "
                       f"({self.platform_cold_from}) + {self.process_cold_s:.2f} s process start -> first "
                       f"prediction ({self.process_cold_from})")
        else:
            out.append(f"  cold start {self.cold_start_s:.2f} s: {self.cold_start_from}")
        measured = ""
        if self.per_galaxy_s is not None and self.measured_vcpus is not None:
            measured = f"{self.per_galaxy_s * 1e3:.3f} ms/galaxy on {self.measured_vcpus:g} vCPUs -> "
        out.append(f"  speed {measured}{self.per_sample_s * 1e3:.3f} ms/sample at {params.ref_memory_mb:.0f} MB "
                   f"({lambda_vcpus(params.ref_memory_mb):g} vCPUs, thread scaling {params.thread_scaling:g}): "
                   f"{self.speed_from}")
        if self.profile is not None:
            extra = ", ".join(f"{k} {self.profile[k]}" for k in ("install", "engine", "mode", "threads")
                              if k in self.profile)
            where = ("shipped cosmicai/simulator/worker_profile.json" if self.profile.get("shipped")
                     else self.profile["path"])
            out.append(f"  worker profile {where}: measured_with {self.profile.get('measured_with')!r}"
                       f", date {self.profile.get('date')!r}" + (f"; {extra}" if extra else ""))
        if others:
            out.append("  everything else (launch ramp, Initialize, Summarize, jitter, fetch): the original's "
                       "fitted constants (docs/simulator.md)")
        return out


def _speed_text(samples_per_sec: float, vcpus: float, speedup: float) -> str:
    text = f"--samples-per-sec {samples_per_sec:g} on {vcpus:g} vCPUs (flags)"
    return text + (f", divided by --speedup {speedup:g}" if speedup != 1 else "")


def original_basis(params: Params = DEFAULT_PARAMS, samples_per_sec: float | None = None,
                   measured_vcpus: float | None = None, speedup: float = 1.0) -> tuple[Params, SpeedBasis]:
    """The original's fitted constants (``cai plan --original``, the planner's behaviour before worker
    profiles): ``params`` unchanged except the optional measured speed / speedup of :func:`speed_params`."""
    vcpus = 6.0 if measured_vcpus is None else measured_vcpus
    if measured_vcpus is not None and samples_per_sec is None:
        raise ConfigError("--measured-vcpus: only applies with --samples-per-sec")
    out = speed_params(params, samples_per_sec, vcpus, speedup)
    if samples_per_sec is not None:
        speed = _speed_text(samples_per_sec, vcpus, speedup)
    else:
        speed = "original's fitted constant" + (f", divided by --speedup {speedup:g}" if speedup != 1 else "")
    basis = SpeedBasis(
        name="original", cold_start_s=out.cold_start_s,
        cold_start_from="original's fitted constant (Lambda platform + imports + model load; not separable)",
        per_sample_s=out.per_sample_s, speed_from=speed,
        per_galaxy_s=None if samples_per_sec is None else 1.0 / samples_per_sec,
        measured_vcpus=None if samples_per_sec is None else vcpus, speedup=speedup)
    return out, basis


def worker_basis(params: Params = DEFAULT_PARAMS, profile: WorkerProfile | None = None,
                 cold_start_s: float | None = None, per_galaxy_s: float | None = None,
                 measured_vcpus: float | None = None, samples_per_sec: float | None = None,
                 speedup: float = 1.0, platform_cold_s: float | None = None) -> tuple[Params, SpeedBasis]:
    """``params`` with our worker's cold start and per-sample speed.

    Cold start: ``platform_cold_s`` (default :data:`PLATFORM_COLD_S`, an assumption) + (``cold_start_s``
    if given, else the profile's). Speed, the first that applies: ``samples_per_sec`` on ``measured_vcpus``
    (default 6, as :func:`speed_params`); ``per_galaxy_s`` on ``measured_vcpus`` (default: the profile's
    ``threads``); the profile's ``per_galaxy_s`` on its ``threads``. The measured speed is moved to the
    reference memory's vCPU share with the thread-scaling exponent, then divided by ``speedup``.
    Raises ConfigError when a needed number is missing or two flags conflict.
    """
    def positive(name: str, value: float) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or value <= 0:
            raise ConfigError(f"{name}: must be a positive number, got {value!r}")
        return float(value)

    if samples_per_sec is not None and per_galaxy_s is not None:
        raise ConfigError("--samples-per-sec and --per-galaxy-ms: give one (they are the same quantity)")
    platform_from = "assumption PLATFORM_COLD_S" if platform_cold_s is None else "--platform-cold-start (flag)"
    platform_cold_s = PLATFORM_COLD_S if platform_cold_s is None else platform_cold_s
    if isinstance(platform_cold_s, bool) or not isinstance(platform_cold_s, (int, float)) \
            or not math.isfinite(platform_cold_s) or platform_cold_s < 0:
        raise ConfigError(f"--platform-cold-start: must be a non-negative number, got {platform_cold_s!r}")
    if measured_vcpus is not None:
        positive("--measured-vcpus", measured_vcpus)
        if samples_per_sec is None and per_galaxy_s is None:
            raise ConfigError("--measured-vcpus: only applies with --samples-per-sec or --per-galaxy-ms "
                              "(the profile's per_galaxy_s is taken on its own 'threads')")
    used_profile = False
    if cold_start_s is not None:
        process_cold = positive("--cold-start", cold_start_s)
        process_from = "--cold-start (flag)"
    elif profile is not None:
        process_cold, process_from, used_profile = profile.cold_start_s, "worker profile", True
    else:
        raise ConfigError("plan: our worker's cold start is unknown: give a worker profile or --cold-start")
    if samples_per_sec is not None:
        positive("--samples-per-sec", samples_per_sec)
        vcpus = 6.0 if measured_vcpus is None else measured_vcpus
        galaxy_s, speed = 1.0 / samples_per_sec, _speed_text(samples_per_sec, vcpus, speedup)
    elif per_galaxy_s is not None:
        galaxy_s = positive("--per-galaxy-ms", per_galaxy_s)
        if measured_vcpus is not None:
            vcpus, on = measured_vcpus, f"--measured-vcpus {measured_vcpus:g}"
        elif profile is not None:
            vcpus, on, used_profile = profile.threads, "the worker profile's threads", True
        else:
            raise ConfigError("--per-galaxy-ms: the vCPUs it was measured on are unknown: give --measured-vcpus "
                              "or a worker profile")
        speed = f"--per-galaxy-ms {galaxy_s * 1e3:g} (flag) on {on}"
    elif profile is not None:
        galaxy_s, vcpus, used_profile = profile.per_galaxy_s, profile.threads, True
        speed = "worker profile (per_galaxy_s on its threads)"
    else:
        raise ConfigError("plan: our worker's speed is unknown: give a worker profile, --per-galaxy-ms or "
                          "--samples-per-sec")
    if speedup != 1 and samples_per_sec is None:
        speed += f", divided by --speedup {speedup:g}"
    out = speed_params(params, 1.0 / galaxy_s, vcpus, speedup)
    total_cold = float(platform_cold_s) + process_cold
    out = out.with_(cold_start_s=total_cold)
    basis = SpeedBasis(
        name="worker", cold_start_s=total_cold, cold_start_from=f"{platform_from} + {process_from}",
        per_sample_s=out.per_sample_s, speed_from=speed, platform_cold_s=float(platform_cold_s),
        platform_cold_from=platform_from, process_cold_s=process_cold, process_cold_from=process_from,
        per_galaxy_s=galaxy_s, measured_vcpus=float(vcpus), speedup=speedup,
        profile=profile.summary() if (profile is not None and used_profile) else None)
    return out, basis


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
    basis: SpeedBasis | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (``provenance``: which cold start and speed were used, and from where)."""
        return {"data_bytes": self.data_bytes, "goal": self.goal, "per_sample_s": self.per_sample_s,
                "recommended": asdict(self.recommended) if self.recommended else None,
                "original": asdict(self.original), "options": [asdict(o) for o in self.options],
                "params": asdict(self.params),
                "provenance": self.basis.to_dict() if self.basis is not None else None}


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
         seeds: Sequence[int] = (0,), arch: str = "x86_64", basis: SpeedBasis | None = None) -> PlanResult:
    """Simulate every option for ``data_bytes`` and pick the best for ``goal`` ("time" or "cost").

    ``basis`` (from :func:`original_basis` / :func:`worker_basis`, which also give ``params``) is only
    recorded: it is printed and written as the plan's provenance."""
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
                      recommended=recommended, original=original, params=params, basis=basis)


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
           f"{result.params.ref_memory_mb:.0f} MB; account concurrency {result.params.account_concurrency})"]
    if result.basis is not None:
        out += result.basis.describe(result.params)
    out.append(head)
    out += [line(o, "*" if o is result.recommended else "") for o in result.options[:top]]
    if result.recommended is None:
        out.append("no feasible option: widen the memory/partition/concurrency options")
    else:
        r = result.recommended
        out.append(f"recommended: {r.partition_mb:g} MB partitions, {r.memory_mb} MB memory, MaxConcurrency "
                   f"{r.max_concurrency} -> {r.total_s:.1f} s, ${r.cost_usd:.3f}")
    o = result.original
    out.append(f"original config (25 MB, {ORIGINAL['memory_mb']} MB, no MaxConcurrency) simulated with the "
               f"numbers above: {o.total_s:.1f} s, ${o.cost_usd:.3f}, {o.ranks} ranks")
    return "\n".join(out)


@dataclass
class Comparison:
    """The same configurations simulated with the original's constants and with our worker's numbers."""

    data_bytes: int
    rows: list[tuple[Option, Option]]      # (original's constants, our worker), one per configuration
    original: SpeedBasis
    worker: SpeedBasis
    original_params: Params = field(repr=False, default=DEFAULT_PARAMS)
    worker_params: Params = field(repr=False, default=DEFAULT_PARAMS)
    seeds: tuple[int, ...] = (0,)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, with both bases' provenance."""
        return {"data_bytes": self.data_bytes, "seeds": list(self.seeds),
                "rows": [{"original": asdict(a), "worker": asdict(b)} for a, b in self.rows],
                "provenance": {"original": self.original.to_dict(), "worker": self.worker.to_dict()},
                "params": {"original": asdict(self.original_params), "worker": asdict(self.worker_params)}}


def compare(data_bytes: int, original: tuple[Params, SpeedBasis], worker: tuple[Params, SpeedBasis],
            partitions_mb: Sequence[float] = COMPARE_PARTITIONS_MB,
            memory_mb: Sequence[int] = (ORIGINAL["memory_mb"],),
            concurrency: Sequence[int] = (ORIGINAL["max_concurrency"],),
            seeds: Sequence[int] = (0,), arch: str = "x86_64") -> Comparison:
    """Simulate each (partition, memory, MaxConcurrency) configuration (default: 5, 10 and 25 MB at the
    original's 10,240 MB without a MaxConcurrency) under both ``(params, basis)`` pairs, the same seeds."""
    if isinstance(data_bytes, bool) or not isinstance(data_bytes, int) or data_bytes <= 0:
        raise ConfigError(f"data size: must be a positive number of bytes, got {data_bytes!r}")
    _check_options(partitions_mb, memory_mb, concurrency)
    rows = [(evaluate(data_bytes, p, m, c, original[0], seeds, arch),
             evaluate(data_bytes, p, m, c, worker[0], seeds, arch))
            for p in partitions_mb for m in memory_mb for c in concurrency]
    return Comparison(data_bytes=data_bytes, rows=rows, original=original[1], worker=worker[1],
                      original_params=original[0], worker_params=worker[0], seeds=tuple(seeds))


def format_comparison(result: Comparison) -> str:
    """Side-by-side table: predicted total wall time and cost per configuration under both bases."""
    gib = result.data_bytes / 1024**3
    seeds = (f"seed {result.seeds[0]}" if len(result.seeds) == 1
             else f"mean of seeds {', '.join(map(str, result.seeds))}")
    out = [f"{gib:.4g} GB: the original's fitted constants vs our worker, same simulator, {seeds}"]
    out += result.original.describe(result.original_params, others=False)
    out += result.worker.describe(result.worker_params)
    out.append(f"{'part MB':>7} {'memory':>6} {'max conc':>8} {'ranks':>6} | {'original s':>10} {'$':>7} | "
               f"{'ours s':>7} {'$':>7} | {'time':>6} {'cost':>6}  note")
    for a, b in result.rows:
        note = "; ".join(dict.fromkeys(r for r in (a.reason, b.reason) if r))
        out.append(f"{a.partition_mb:>7g} {a.memory_mb:>6} {a.max_concurrency:>8} {a.ranks:>6} | "
                   f"{a.total_s:>10.1f} {a.cost_usd:>7.3f} | {b.total_s:>7.1f} {b.cost_usd:>7.3f} | "
                   f"{b.total_s / a.total_s:>5.2f}x {b.cost_usd / a.cost_usd:>5.2f}x  {note}".rstrip())
    out.append("time, cost: ours / original's (below 1 = our worker is predicted faster / cheaper)")
    return "\n".join(out)
