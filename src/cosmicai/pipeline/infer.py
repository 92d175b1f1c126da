"""Stage 2, infer: one task = one rank. :func:`run_task` is the worker entry point of every backend.

The model is loaded once per process and reused by later tasks; the next partition is fetched (and checked and
decoded) in a background thread while the current one is predicted. Outputs are written atomically:
``predictions/<rank>.parquet`` first, then the record ``ranks/<rank>.json`` LAST, so a record means the rank
is complete. On failure ``errors/<rank>.json`` is written and the exception re-raised.

Rows whose inputs cannot be trusted are still predicted (rows in == rows out) but flagged (the ``flag``
column): non-finite inputs (with ``drop_nonfinite``; their prediction is NaN), predictions that overflowed, and
inputs out of range (:data:`MAGNITUDE_RANGE`, :data:`PIXEL_LIMIT`; their prediction is kept, not scored).
Predictions outside the redshift range the weights were trained on are marked in ``outside_training_range``
and counted; they are kept and scored (leaving them out would hide the model's own failures). Catalogue columns
a partition carries (``Partition.columns``) follow the standard columns, unchanged.
"""

from __future__ import annotations

import math
import os
import platform
import socket
import time
import traceback
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime, timezone
from typing import Any

import numpy as np

from .. import storage
from ..data.formats import INPUT_BITS_PER_SAMPLE, Partition, sha256_hex
from ..errors import CaiError, ConfigError, DataError, OutOfMemoryError
from .plan import Plan, check_task_digest, current_plan_hash, load_plan
from ..models.worker import worker_models
from ..results import (MAGNITUDE_RANGE, ORIGINAL_KEYS, PHASES, PIXEL_LIMIT, PREDICTION_COLUMNS, ErrorReport, RankRecord,
                       RunFolder)


def out_of_range_rows(data: Partition) -> tuple[np.ndarray, np.ndarray]:
    """Boolean masks ``(magnitudes, pixels)`` of rows with a finite magnitude outside :data:`MAGNITUDE_RANGE`,
    and with a finite pixel beyond +-:data:`PIXEL_LIMIT`. Rows with non-finite inputs are never in them."""
    n = len(data)
    if not n:
        return np.zeros(0, dtype=bool), np.zeros(0, dtype=bool)
    lo, hi = MAGNITUDE_RANGE
    with np.errstate(invalid="ignore"):
        mags = np.asarray(data.magnitudes)
        mag_bad = ((mags < lo) | (mags > hi)).any(axis=1)
        # Row extremes: one pass each, no per-pixel temporary; NaN rows compare False, inf rows are removed below.
        pix_bad = (np.max(data.images, axis=(1, 2, 3)) > PIXEL_LIMIT) | (np.min(data.images, axis=(1, 2, 3))
                                                                         < -PIXEL_LIMIT)
    if mag_bad.any() or pix_bad.any():
        finite = ~data.nonfinite_rows()
        mag_bad &= finite
        pix_bad &= finite
    return mag_bad, pix_bad


def _model_for(cfg: dict[str, Any], mode: str) -> tuple[Any, bool, float]:
    """This worker's predictor (``WorkerModels.get``) for a plan's config in ``mode``."""
    return worker_models().get(cfg["model"], cfg.get("weights"), cfg["device"], mode, cfg.get("weights_sha256"))


def checked_model(cfg: dict[str, Any], fast: Any, first: Any, sample: str, untrusted: np.ndarray | None = None
                  ) -> tuple[Any, dict[str, Any]]:
    """The predictor a fast-mode rank uses, and the guard's record: ``(predictor, fast_check)``.

    The guard (:mod:`cosmicai.models.guard`) compares ``fast`` with exact once per process and weights, on the
    first rows of ``first`` (the rank's first partition; rows where ``untrusted`` is set are skipped: inputs out
    of range may make any two engines disagree); when they disagree beyond the tolerance the exact
    predictor is returned (policy ``fallback``) or ModelError raised (``strict``). A later task of the same
    process reuses the measurement and records that it paid nothing for it."""
    from ..models.guard import CALIBRATION_ROWS, calibrate, shared_calibrate, shared_key, unchecked

    models = worker_models()
    policy = cfg.get("fast_guard") or "fallback"
    key = (cfg["model"], cfg.get("weights"), cfg.get("weights_sha256"), cfg["device"], models.threads, policy)
    check = models.fast_check(key)
    reused = check is not None
    shared = False
    if check is None and policy == "off":
        check = unchecked()
    elif check is None:
        keep = np.flatnonzero(~untrusted)[:CALIBRATION_ROWS] if untrusted is not None and untrusted.any() else None
        if keep is not None and keep.size:
            first = first.take(keep)
        images, mags = first.images, first.magnitudes  # non-finite rows come back NaN and are not compared

        def measure() -> Any:
            exact, _, exact_load = _model_for(cfg, "exact")
            return calibrate(fast, exact, images, mags, policy="fallback", sample=sample,
                             batch_size=int(cfg["batch_size"]), load_seconds=exact_load)

        # once per run: a check another worker process of this run stored (same weights, engine, CPU) is reused
        shared_as = shared_key(cfg["model"], cfg.get("weights_sha256"), str(getattr(fast, "engine", "")),
                               cfg["device"], str(cfg.get("data") or ""))
        url = RunFolder(cfg["result"]).fast_check(shared_as) if cfg.get("result") and shared_as else None
        check, shared = shared_calibrate(url, shared_as, policy, measure)
        if check.passed:  # the exact model is not needed any more
            models.drop(cfg["model"], cfg.get("weights"), cfg["device"], "exact")
        else:
            warnings.warn(f"fast mode deviates from exact by max |dz| {check.max_dz:.2e} (tolerance "
                          f"{check.tolerance:g}) on {check.rows} rows of {sample}: predicting in exact mode",
                          RuntimeWarning, stacklevel=2)
    models.keep_fast_check(key, check)
    record = check.to_dict()
    if reused:
        record.update(seconds=0.0, measured_by_earlier_task=True)
    elif shared:
        record.update(measured_by_other_worker=True)
    predictor = _model_for(cfg, "exact")[0] if check.mode_used == "exact" else fast
    return predictor, record


def check_fast_once(plan: Plan, rank: int) -> None:
    """Measure the fast-mode check here, on ``rank``'s first partition, and store it for the run, so worker
    processes that start together reuse it (:func:`checked_model`) instead of each paying for it."""
    cfg = plan.config
    if cfg.get("mode") != "fast" or (cfg.get("fast_guard") or "fallback") == "off" or not plan.tasks.get(rank):
        return
    part = plan.tasks[rank][0]
    data, _, _, masks = _fetch_checked(part, bool(cfg.get("drop_nonfinite")))
    if len(data):
        checked_model(cfg, _model_for(cfg, "fast")[0], data, part["name"], untrusted=masks[0] | masks[1])
    worker_models().clear()  # the workers load their own


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def _peak_rss_mb() -> float:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1e6 if platform.system() == "Darwin" else peak * 1024 / 1e6


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


class DamagedPartitionError(DataError):
    """A partition is not the file the plan was made from (changed, truncated or corrupt): only restoring it
    lets a rerun resume. Reported as a DataError; its error report carries ``"remedy": "restore"``."""

    remedy = "restore"

    def __init__(self, message: str, partition: str) -> None:
        super().__init__(message)
        self.partition = partition

    def __reduce__(self) -> tuple:  # crosses process boundaries (pools, Dask) with its partition
        return type(self), (str(self), self.partition)


def _restore_hint(part: dict[str, Any]) -> str:
    digest = f" (sha256 {part['sha256'][:12]}...)" if part.get("sha256") else ""
    return (f"restore {part['name']} from the dataset's source as it was when the run was planned{digest}, then "
            "rerun `cai run` with the same config to resume (a rerun alone fails the same way)")


def _fetch(part: dict[str, Any], allow_nonfinite: bool) -> tuple[Partition, float, float]:
    """Read, verify and decode one partition: (partition, fetch seconds, decode seconds)."""
    from ..data.partition import decode, read_partition_bytes

    t0 = time.perf_counter()
    try:
        data = read_partition_bytes(part["url"], part.get("bytes"), "the plan")  # header checked first
    except MemoryError as exc:
        raise _out_of_memory("reading", f"partition {part['name']}", part.get("rows"), part.get("bytes"), exc) from exc
    t1 = time.perf_counter()
    if part.get("bytes") is not None and len(data) != part["bytes"]:
        raise DamagedPartitionError(f"{part['url']}: size is {len(data)} bytes but the plan lists {part['bytes']} "
                                    f"(partition changed or truncated since planning); {_restore_hint(part)}",
                                    part["name"])
    if part.get("sha256") and sha256_hex(data) != part["sha256"]:
        raise DamagedPartitionError(f"{part['url']}: sha256 does not match the manifest (corrupt or changed "
                                    f"partition); {_restore_hint(part)}", part["name"])
    try:
        decoded = decode(data, part["name"], allow_nonfinite=allow_nonfinite)
    except MemoryError as exc:
        raise _out_of_memory("decoding", f"partition {part['name']}", part.get("rows"), len(data), exc) from exc
    if part.get("rows") is not None and len(decoded) != part["rows"]:
        raise DamagedPartitionError(f"{part['url']}: holds {len(decoded)} rows but the manifest lists "
                                    f"{part['rows']}; {_restore_hint(part)}", part["name"])
    return decoded, t1 - t0, time.perf_counter() - t1


def _out_of_memory(doing: str, what: str, rows: int | None, nbytes: int | None, exc: BaseException,
                   batch_size: int | None = None) -> OutOfMemoryError:
    """The one-line error for a MemoryError while ``doing`` ``what`` (e.g. "partition part-000001.safetensors";
    an OutOfMemoryError is kept as it is)."""
    if isinstance(exc, OutOfMemoryError):
        return exc
    size = ", ".join(x for x in (f"{rows:,} rows" if rows is not None else "",
                                 f"{nbytes / 1e6:,.1f} MB" if nbytes is not None else "",
                                 f"batch {batch_size}" if batch_size else "") if x)
    detail = f": {exc}" if str(exc) else ""
    return OutOfMemoryError(
        f"out of memory while {doing} {what}{f' ({size})' if size else ''}{detail}; use fewer rows per "
        "partition (cai data split --partition-size, e.g. 25MB) or a smaller --batch-size, or give each worker more "
        "memory (fewer --workers per machine, a larger job or container memory limit)")


def _fetch_checked(part: dict[str, Any], allow_nonfinite: bool
                   ) -> tuple[Partition, float, float, tuple[np.ndarray, np.ndarray]]:
    """:func:`_fetch`, then the out-of-range masks (in the fetch thread, counted as decode time)."""
    try:
        data, fetch_s, decode_s = _fetch(part, allow_nonfinite)
        t0 = time.perf_counter()
        masks = out_of_range_rows(data)
    except MemoryError as exc:
        raise _out_of_memory("reading or decoding", f"partition {part['name']}", part.get("rows"), part.get("bytes"),
                             exc) from exc
    return data, fetch_s, decode_s + time.perf_counter() - t0, masks


def _stored_record(plan: Plan, rank: int) -> dict[str, Any] | None:
    run = RunFolder(plan.result_url)
    url = run.record(rank)
    if not storage.exists(url):
        return None
    try:
        record = storage.read_json(url)
    except CaiError:
        return None
    if not isinstance(record, dict) or record.get("plan_hash") != plan.plan_hash or not _predictions_intact(
            record, storage.size(run.prediction(rank))):
        return None
    return record


def _predictions_intact(record: dict[str, Any], size: int | None) -> bool:
    """True when the rank's predictions file exists with the size its record wrote (catches damaged copies)."""
    return size is not None and record.get("predictions_bytes", size) == size


def done_ranks(plan: Plan) -> set[int]:
    """Ranks whose record (for this plan hash) and predictions exist: one listing per folder, not per rank."""
    from ..results import rank_of

    run = RunFolder(plan.result_url)
    pred_size = {rank_of(u): n for u, n in storage.list_files_with_sizes(run.predictions_dir, ".parquet")}
    urls = [u for u in storage.list_files(run.ranks_dir, ".json")
            if rank_of(u) in pred_size and rank_of(u) in plan.tasks]
    done = set()
    for url, record in zip(urls, storage.map_urls(storage.read_json, urls)):
        if isinstance(record, CaiError):  # unreadable record: the rank is redone
            continue
        if isinstance(record, BaseException):
            raise record
        rank = rank_of(url)
        if (isinstance(record, dict) and record.get("plan_hash") == plan.plan_hash
                and _predictions_intact(record, pred_size[rank])):
            done.add(rank)
    return done


def run_task(result_url: str, rank: int, plan_hash: str | None = None, task: dict[str, Any] | None = None
             ) -> RankRecord:
    """Run one rank of the plan under ``result_url`` and return its record (the stored one if already done).

    ``plan_hash`` and ``task`` come with the task items (:meth:`Plan.task_list`): ``task`` carries the rank's own
    partitions and the run config, so the worker does not read the whole plan; a different plan under
    ``result_url`` (replaced by another run) is refused instead of computing a rank of someone else's run."""
    rank = int(rank)
    if plan_hash is not None:
        now = current_plan_hash(result_url)
        if now != plan_hash:
            raise ConfigError(f"{result_url}: the plan was replaced while this run was going (plan "
                              f"{str(now)[:12]}, this task belongs to {str(plan_hash)[:12]}); rank {rank} was not run")
    if task is not None and plan_hash:  # an item is run only as the plan wrote it, on every backend
        check_task_digest({"result_url": result_url, "rank": rank, "plan_hash": plan_hash, "task": task})
        plan = Plan.for_task(result_url, rank, plan_hash, task)
    else:
        plan = load_plan(result_url)
    done = _stored_record(plan, rank)
    if done is not None:
        return done
    parts = plan.tasks.get(rank)
    if not parts:
        raise ConfigError(f"rank {rank} has no partitions in the plan at {result_url} (ranks: {plan.ranks})")
    started = _now()
    try:
        try:
            return _run(plan, rank, parts, started)
        except MemoryError as exc:
            if isinstance(exc, OutOfMemoryError):
                raise
            names = ", ".join(p["name"] for p in parts[:3]) + (" ..." if len(parts) > 3 else "")
            rows = sum(int(p["rows"]) for p in parts) if all(p.get("rows") is not None for p in parts) else None
            raise _out_of_memory(f"running rank {rank} on", f"partition(s) {names}", rows, None, exc) from exc
    except BaseException as exc:
        if not isinstance(exc, KeyboardInterrupt):
            _write_error(plan, rank, parts, exc, started)
        raise


def _write_error(plan: Plan, rank: int, parts: list[dict], exc: BaseException, started: str) -> None:
    tail = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))[-4000:]
    # A damaged partition is reported as the DataError it is; ``remedy`` tells summarize to say "restore".
    error_type = "DataError" if isinstance(exc, DamagedPartitionError) else type(exc).__name__
    info: ErrorReport = {"rank": rank, "partitions": [p["name"] for p in parts], "error_type": error_type,
            "message": str(exc) or repr(exc), "traceback": tail, "plan_hash": plan.plan_hash,
            "host": socket.gethostname(),
            "pid": os.getpid(), "started_at": started, "failed_at": _now()}
    if isinstance(exc, DamagedPartitionError):
        info.update(remedy=exc.remedy, damaged_partition=exc.partition)
    try:
        storage.write_json(RunFolder(plan.result_url).error(rank), info)
    except CaiError:
        pass  # the original exception matters more than a failed error report


def record_failure(plan: Plan, rank: int, error_type: str, message: str, recorded_by: str) -> dict[str, Any]:
    """Name a rank whose task died without reporting (killed, out of memory, timed out) in ``errors/<rank>.json``.

    Keeps the worker's own error report when it wrote one for this plan; returns what is on record, with
    ``status`` "failed", or "ok" when the rank's record exists after all.
    """
    url = RunFolder(plan.result_url).error(rank)
    existing = storage.read_json(url) if storage.exists(url) else None
    if isinstance(existing, dict) and existing.get("plan_hash") == plan.plan_hash:
        return {"rank": rank, "status": "failed", "error_type": existing.get("error_type", error_type),
                "message": str(existing.get("message", message)), "recorded_by": "pipeline"}
    if _stored_record(plan, rank) is not None:
        return {"rank": rank, "status": "ok", "note": f"record exists despite {error_type}"}
    parts = [p["name"] for p in plan.tasks.get(rank, [])]
    report: ErrorReport = {"rank": rank, "partitions": parts, "error_type": error_type, "message": message,
                           "traceback": None, "plan_hash": plan.plan_hash, "recorded_by": recorded_by,
                           "failed_at": _now()}
    storage.write_json(url, report)
    return {"rank": rank, "status": "failed", "error_type": error_type, "message": message,
            "recorded_by": recorded_by}


class _RankOutput:
    """What a rank has predicted so far: one column chunk per partition, and the per-partition counts."""

    def __init__(self, training_range: tuple[float, float] | None = None) -> None:
        self.columns: dict[str, list[np.ndarray]] = {k: [] for k in ("object_id", "partition", "row", "z_pred",
                                                                      "z_true", "flag", "outside_training_range")}
        self.training_range = training_range
        self.outside: dict[str, Any] = {"rows": 0, "by_partition": {},
                                        "range": list(training_range) if training_range else None}
        self.catalog: dict[str, list[np.ndarray]] | None = None  # name -> chunks, in the first partition's order
        self._catalog_source = ""
        self.rows_per_part: dict[str, int] = {}
        self.bad_predictions: dict[str, int] = {}
        self.nonfinite_rows = 0
        self.out_of_range: dict[str, Any] = {"rows": 0, "magnitudes": 0, "pixels": 0, "by_partition": {}}
        self.num_batches = 0
        self.has_z = True

    def add(self, name: str, data: Partition, z: np.ndarray, allow_nonfinite: bool, batch_size: int,
            out_of_range: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        """Check and keep one partition's predictions (non-finite inputs, overflowing outputs and ``out_of_range``
        inputs, the masks of :func:`out_of_range_rows`, flagged)."""
        n = len(data)
        z = np.asarray(z, dtype=np.float32)
        if z.shape != (n,):
            raise DataError(f"{name}: the model returned shape {z.shape} for {n} rows")
        self._check_catalog(name, data.columns)
        flag = data.nonfinite_rows() if allow_nonfinite else np.zeros(n, dtype=bool)
        z = np.where(flag, np.float32(np.nan), z)
        # Finite but extreme inputs (a pixel of 1e19, magnitudes of 3e38) can overflow the network: such rows
        # are flagged and counted too, never passed off as predictions.
        overflow = ~np.isfinite(z) & ~flag
        if overflow.any():
            self.bad_predictions[name] = int(overflow.sum())
            flag = flag | overflow
            z = np.where(overflow, np.float32(np.nan), z)
        self.nonfinite_rows += int(np.count_nonzero(flag))
        if out_of_range is not None:
            mags, pixels = out_of_range
            either = mags | pixels
            if either.any():
                count = self.out_of_range
                count["rows"] += int(np.count_nonzero(either))
                count["magnitudes"] += int(np.count_nonzero(mags))
                count["pixels"] += int(np.count_nonzero(pixels))
                count["by_partition"][name] = int(np.count_nonzero(either))
                flag = flag | either
        self.num_batches += math.ceil(n / batch_size)
        self.rows_per_part[name] = n
        cols = self.columns
        cols["object_id"].append(np.asarray(data.object_id, dtype=np.int64))
        cols["partition"].append(np.full(n, len(self.rows_per_part) - 1, dtype=np.int32))  # index into names
        cols["row"].append(np.arange(n, dtype=np.int32))
        cols["z_pred"].append(z)
        cols["flag"].append(flag)
        cols["outside_training_range"].append(self._outside(name, z))
        for key, values in data.columns.items():
            self.catalog[key].append(np.asarray(values))
        if data.redshift is None:
            self.has_z = False
        else:
            cols["z_true"].append(np.asarray(data.redshift, dtype=np.float32))

    def _outside(self, name: str, z: np.ndarray) -> np.ndarray:
        """Rows whose (finite) prediction is outside the weights' training range; counted per partition."""
        if self.training_range is None:
            return np.zeros(z.shape, dtype=bool)
        lo, hi = self.training_range
        with np.errstate(invalid="ignore"):
            outside = (z < lo) | (z > hi)
        count = int(np.count_nonzero(outside))
        if count:
            self.outside["rows"] += count
            self.outside["by_partition"][name] = count
        return outside

    def _check_catalog(self, name: str, columns: dict[str, np.ndarray]) -> None:
        """Every partition of the rank must carry the same catalogue columns (names, order, dtypes), none named
        like a prediction column."""
        shape = [(k, np.asarray(v).dtype.str) for k, v in columns.items()]
        if self.catalog is None:
            clash = sorted(set(columns) & set(PREDICTION_COLUMNS))
            if clash:
                raise DataError(f"{name}: catalogue column(s) {clash} have the names of prediction columns; "
                                "rename them when converting the data (cai data convert)")
            self.catalog = {k: [] for k in columns}
            self._catalog_shape, self._catalog_source = shape, name
        elif shape != self._catalog_shape:
            raise DataError(f"{name}: catalogue columns {_describe(shape)} differ from {self._catalog_source}'s "
                            f"{_describe(self._catalog_shape)}; every partition of a dataset must carry the same "
                            "columns (convert the data again with one catalogue)")

    @property
    def rows(self) -> int:
        return sum(self.rows_per_part.values())

    def parquet(self) -> bytes:
        """The rank's predictions file (object_id, partition, row, z_pred, [z_true], flag, outside_training_range,
        then the catalogue columns)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        cols = self.columns
        table = {"object_id": pa.array(np.concatenate(cols["object_id"]), pa.int64()),
                 "partition": pa.DictionaryArray.from_arrays(pa.array(np.concatenate(cols["partition"]), pa.int32()),
                                                             pa.array(list(self.rows_per_part), pa.string())),
                 "row": pa.array(np.concatenate(cols["row"]), pa.int32()),
                 "z_pred": pa.array(np.concatenate(cols["z_pred"]), pa.float32())}
        if self.has_z:
            table["z_true"] = pa.array(np.concatenate(cols["z_true"]), pa.float32())
        table["flag"] = pa.array(np.concatenate(cols["flag"]), pa.bool_())
        table["outside_training_range"] = pa.array(np.concatenate(cols["outside_training_range"]), pa.bool_())
        for key, chunks in (self.catalog or {}).items():
            table[key] = pa.array(np.concatenate(chunks))  # the partition's own dtype (uint64 ids stay exact)
        sink = pa.BufferOutputStream()
        pq.write_table(pa.table(table), sink)
        return sink.getvalue().to_pybytes()


def _predict_partitions(cfg: dict[str, Any], prefetch: bool, parts: list[dict[str, Any]], rank: int,
                        phases: dict[str, float]) -> tuple[_RankOutput, Any, bool, dict[str, Any] | None]:
    """Fetch (the next partition while this one is predicted, unless ``prefetch`` is off), check the fast mode
    once, predict; returns ``(output, predictor, cold, fast_check)`` and adds to ``phases``."""
    batch_size = int(cfg["batch_size"])
    allow_nonfinite = bool(cfg.get("drop_nonfinite"))
    out: _RankOutput | None = None
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"cai-fetch-{rank}")
    try:
        pending: Future = pool.submit(_fetch_checked, parts[0], allow_nonfinite)
        predictor, cold, load_s = _model_for(cfg, cfg["mode"])
        out = _RankOutput(getattr(predictor, "training_range", None))
        fast_check = None
        phases["model_load"] = load_s
        for i, part in enumerate(parts):
            t0 = time.perf_counter()
            data, fetch_s, decode_s, out_of_range = pending.result()
            phases["wait"] += time.perf_counter() - t0
            phases["fetch"] += fetch_s
            phases["decode"] += decode_s
            if fast_check is None and cfg["mode"] == "fast" and len(data):
                predictor, fast_check = checked_model(cfg, predictor, data, part["name"],
                                                      untrusted=out_of_range[0] | out_of_range[1])
                phases["fast_check"] = fast_check["seconds"]
            if prefetch and i + 1 < len(parts):
                pending = pool.submit(_fetch_checked, parts[i + 1], allow_nonfinite)
            n = len(data)
            t0 = time.perf_counter()
            try:
                z = predictor.predict(data.images, data.magnitudes, batch_size=batch_size) if n else \
                    np.zeros(0, np.float32)
            except MemoryError as exc:
                raise _out_of_memory("predicting", f"partition {part['name']}", n, data.nbytes, exc,
                                     batch_size) from exc
            phases["inference"] += time.perf_counter() - t0
            if not prefetch and i + 1 < len(parts):
                pending = pool.submit(_fetch_checked, parts[i + 1], allow_nonfinite)
            out.add(part["name"], data, z, allow_nonfinite, batch_size, out_of_range)
            del data
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return out, predictor, cold, fast_check


def _run(plan: Plan, rank: int, parts: list[dict[str, Any]], started: str) -> RankRecord:
    """Predict the rank's partitions, write its predictions, then its record (last: it marks the rank done)."""
    cfg = plan.config
    wall0 = time.perf_counter()
    phases = dict.fromkeys(PHASES, 0.0)
    out, predictor, cold, fast_check = _predict_partitions(cfg, bool(plan.options.get("prefetch", True)), parts,
                                                           rank, phases)
    t0 = time.perf_counter()
    pred_bytes = out.parquet()
    run = RunFolder(plan.result_url)
    storage.write_bytes(run.prediction(rank), pred_bytes)
    phases["write"] = time.perf_counter() - t0
    record = _rank_record(plan, rank, parts, out, phases, time.perf_counter() - wall0, predictor, cold, fast_check,
                          len(pred_bytes), started)
    storage.write_json(run.record(rank), record)
    storage.remove(run.error(rank))
    return record


def _rank_record(plan: Plan, rank: int, parts: list[dict[str, Any]], out: _RankOutput, phases: dict[str, float],
                 wall: float, predictor: Any, cold: bool, fast_check: dict[str, Any] | None, pred_bytes: int,
                 started: str) -> RankRecord:
    """The rank record: the original's keys first (``results.ORIGINAL_KEYS``), then ours."""
    cfg = plan.config
    batch_size = int(cfg["batch_size"])
    rows, num_batches = out.rows, out.num_batches
    prefix = storage.basename(plan.data_url)
    record: RankRecord = {
        "total_cpu_time (seconds)": wall,
        "total_cpu_memory (MB)": _peak_rss_mb(),
        "execution_time (seconds/batch)": phases["inference"] / num_batches if num_batches else 0.0,
        "num_batches": num_batches,
        "batch_size": batch_size,
        "device": cfg["device"],
        "throughput_bps": rows * INPUT_BITS_PER_SAMPLE / wall if wall > 0 else 0.0,
        "sample_persec": rows / wall if wall > 0 else 0.0,
        "result_path": plan.result_url,
        "data_path": ",".join(f"{prefix}/{p['name']}" for p in parts),
        "rank": rank,
        "rows": rows,
        "partitions": [p["name"] for p in parts],
        "partition_rows": out.rows_per_part,
        "nonfinite_rows": out.nonfinite_rows,
        "nonfinite_predictions": out.bad_predictions,
        "out_of_range_rows": out.out_of_range["rows"],
        "out_of_range": out.out_of_range,
        "outside_training_range": out.outside,
        "phases": phases,
        "peak_rss_mb": _peak_rss_mb(),
        "cold_start": cold,
        "cpu": {"host": socket.gethostname(), "pid": os.getpid(), "cpu_model": _cpu_model(),
                "cores": os.cpu_count(), "threads": worker_models().threads_in_use(predictor)},
        "model": cfg["model"],
        "weights": getattr(predictor, "card", None),
        "mode": cfg["mode"],
        "mode_used": fast_check["mode_used"] if fast_check else cfg["mode"],
        "fast_check": fast_check,
        "plan_hash": plan.plan_hash,
        "predictions_bytes": pred_bytes,
        "started_at": started,
        "finished_at": _now(),
        "error": None,
    }
    assert list(record)[:len(ORIGINAL_KEYS)] == list(ORIGINAL_KEYS)
    return record


def _describe(shape: list[tuple[str, str]]) -> str:
    return "[" + ", ".join(f"{k} {np.dtype(t).name}" for k, t in shape) + "]" if shape else "[] (none)"
