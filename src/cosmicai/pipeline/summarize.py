"""Stage 3, summarize: check a run is complete and gather its outputs into one table and one report.

Writes ``combined_data.json`` (the original's list of per-rank records), ``predictions.parquet`` (one table in
plan order: rank, partition, row) and ``summary.json``. Only reads what the ranks wrote, so running it twice
gives the same files.

Memory is bounded whatever the number of ranks: the ranks' predictions are read a window at a time
(``READ_AHEAD`` files, ``READ_THREADS`` requests in flight) in rank order and streamed into
``predictions.parquet`` one row group at a time, the partition column kept dictionary-encoded; the metrics are
accumulated chunk by chunk (:class:`~cosmicai.pipeline.metrics.MetricsAccumulator`). What stays is the records,
one float64 dz per scored row (for the medians) and a row group or two of predictions.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections import defaultdict
from datetime import datetime
from typing import Any

from .. import storage
from ..data.formats import INPUT_BITS_PER_SAMPLE
from ..errors import CaiError, DataError
from .metrics import MetricsAccumulator, append_grown
from .plan import Plan, load_plan
from ..results import MAGNITUDE_RANGE, PHASES, PIXEL_LIMIT, PREDICTION_COLUMNS
from ..results import ORIGINAL_KEYS, RunFolder, Summary, rank_of



class IncompleteRunError(CaiError):
    """Some ranks are missing or failed, or rows in != rows out."""


class CatalogMismatchError(DataError):
    """Two ranks' predictions carry different catalogue columns (names, order or types)."""


def _field_list(fields: list[Any]) -> str:
    return "[" + ", ".join(f"{f.name} {f.type}" for f in fields) + "]"


def _read_records(plan: Plan, folder: str, reader: "storage.BulkReader | None" = None) -> dict[int, dict[str, Any]]:
    reader = reader or storage.BulkReader(plan.result_url)
    out = {}
    urls = [u for u in storage.list_files(folder, ".json") if rank_of(u) is not None]
    for url, rec in zip(urls, storage.map_urls(reader.read_json, urls, threads=READ_THREADS)):
        if isinstance(rec, BaseException):
            raise rec
        if isinstance(rec, dict) and rec.get("plan_hash") == plan.plan_hash:
            out[rank_of(url)] = rec
    return out


def _ts(value: str) -> float:
    return datetime.fromisoformat(value).timestamp()


def _busy_seconds(records: list[dict[str, Any]]) -> float:
    """Length of the union of the tasks' [started, finished] intervals (idle gaps between resumes excluded)."""
    spans = sorted((_ts(r["started_at"]), _ts(r["finished_at"])) for r in records)
    total, cur_s, cur_e = 0.0, None, None
    for s, e in spans:
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                total += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    if cur_e is not None:
        total += cur_e - cur_s
    return total


def _clean(obj: Any) -> Any:
    """Replace NaN/inf by None so summary.json is strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_clean(v) for v in obj]
    return obj


def summarize(result_url: str, allow_failures: bool = False) -> Summary:
    """Check completeness against the plan, write the combined outputs and return the summary.

    Raises IncompleteRunError naming missing or failed ranks (and any row-count mismatch) unless
    ``allow_failures``; the files are written either way. Memory is bounded (see the module docstring).
    Three steps: :func:`_check` the records against the plan, :func:`_collect` the ranks' predictions in one
    streamed pass, :func:`_write` the combined files and the summary.
    """
    started = time.perf_counter()
    plan = load_plan(result_url)
    reader = storage.BulkReader(result_url)
    records, errors, failed, missing = _check(result_url, plan, reader)
    gathered = _collect(plan, records, reader)
    try:
        for rank in gathered.unreadable:
            del records[rank]
        missing = sorted(missing + gathered.unreadable)
        summary = _summary(result_url, plan, records, errors, failed, missing, gathered)
        _write(result_url, records, gathered)
    except BaseException:
        gathered.abort()
        raise
    summary["stages"] = {**summary["stages"], "summarize_s": time.perf_counter() - started}
    summary = _clean(summary)
    storage.write_json(RunFolder(result_url).summary, summary)  # written here only, once per summarize
    if not summary["completeness"]["complete"] and not allow_failures:
        raise IncompleteRunError(incomplete_message(summary))
    return summary


def _check(result_url: str, plan: Plan, reader: storage.BulkReader) -> tuple[dict[int, dict], dict[int, dict], list[int], list[int]]:
    """The rank records and error reports: ``(records, errors, failed ranks, missing ranks)``; a record of a
    rank the plan does not have is a DataError."""
    folder = RunFolder(result_url)
    records = _read_records(plan, folder.ranks_dir, reader)
    errors = {r: e for r, e in _read_records(plan, folder.errors_dir, reader).items() if r not in records}
    planned = plan.ranks
    stray = sorted(set(records) - set(planned))
    if stray:
        raise DataError(f"{result_url}: records for ranks {stray} that are not in the plan")
    failed = sorted(r for r in errors if r in planned)
    missing = sorted(r for r in planned if r not in records and r not in errors)
    return records, errors, failed, missing


def _collect(plan: Plan, records: dict[int, dict[str, Any]], reader: storage.BulkReader) -> _Gathered:
    """One pass over the ranks' predictions (redone once with the wider schema if a later rank has a column the
    first lacked); the caller commits or aborts its streamed output."""
    columns: dict[str, Any] | None = None
    while True:
        gathered = _Gathered(plan, records, columns, reader)
        try:
            gathered.run()
            return gathered
        except _NewColumn as grow:  # a later rank has a column the first did not: redo with it (rare)
            gathered.abort()
            columns = grow.columns
        except BaseException:
            gathered.abort()
            raise


def _summary(result_url: str, plan: Plan, records: dict[int, dict[str, Any]], errors: dict[int, dict[str, Any]], failed: list[int],
             missing: list[int], gathered: _Gathered) -> dict[str, Any]:
    """summary.json's contents (before cleaning non-JSON floats)."""
    problems, part_done = gathered.problems, gathered.part_done
    twice = sorted(name for name, count in part_done.items() if count > 1)
    if twice:
        problems.append(f"partition(s) {twice[:10]} were predicted more than once")
    rows_out = gathered.rows_out
    summary: dict[str, Any] = {
        "result_url": result_url, "data_url": plan.data_url, "plan_hash": plan.plan_hash,
        "model": plan.config.get("model"), "mode": plan.config.get("mode"), "device": plan.config.get("device"),
        "batch_size": plan.config.get("batch_size"), "world_size": plan.world_size,
        "completeness": {
            "complete": not (missing or failed or problems) and len(part_done) == len(plan.partitions),
            "ranks_planned": len(plan.ranks), "ranks_done": len(records), "missing_ranks": missing,
            "failed_ranks": failed, "partitions_planned": len(plan.partitions), "partitions_done": len(part_done),
            "rows_planned": plan.total_rows, "rows_in": gathered.rows_in, "rows_out": rows_out,
            "problems": problems},
        "failures": [{k: errors[r].get(k) for k in ("rank", "partitions", "error_type", "message", "remedy",
                                                     "damaged_partition")}
                     for r in failed],
    }
    summary.update(_timing(plan, records, rows_out))
    summary.update(_modes_used(plan, records))
    summary["nonfinite_predictions"] = gathered.nonfinite_summary()
    summary["out_of_range"] = out_of_range_summary(records)
    summary["weights"] = weights_summary(plan, records)
    summary["outside_training_range"] = outside_training_range_summary(records, summary["weights"])
    summary["catalog_columns"] = [f.name for f in gathered.catalog_fields or []]
    summary["duplicate_ids"] = gathered.ids.result()  # before the metrics: their dz array is freed after
    summary["metrics"] = gathered.metrics.result() if gathered.metrics is not None else None
    return summary


def out_of_range_summary(records: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Rows flagged for inputs out of range (``results.MAGNITUDE_RANGE``, ``results.PIXEL_LIMIT``), from the rank
    records: ``{"rows", "magnitudes", "pixels", "n_partitions", "partitions", "by_partition", "magnitude_range",
    "pixel_limit"}`` (the first ``NAMED_PARTITIONS`` partitions in rank order are named, with their counts)."""
    totals = {"rows": 0, "magnitudes": 0, "pixels": 0}
    parts: dict[str, int] = {}
    for rank in sorted(records):
        counts = records[rank].get("out_of_range")
        if not isinstance(counts, dict):  # a rank recorded before inputs were range-checked
            continue
        for key in totals:
            totals[key] += int(counts.get(key) or 0)
        for name, count in (counts.get("by_partition") or {}).items():
            parts[name] = parts.get(name, 0) + int(count)
    named = list(parts)[:NAMED_PARTITIONS]
    return {**totals, "n_partitions": len(parts), "partitions": named,
            "by_partition": {name: parts[name] for name in named},
            "magnitude_range": list(MAGNITUDE_RANGE), "pixel_limit": PIXEL_LIMIT}


def weights_summary(plan: Plan, records: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """The weights the run used, as the ranks recorded them (``registry.weights_card``); when no rank finished,
    what the plan says (model, file, sha256), the rest unknown."""
    for rank in sorted(records):
        card = records[rank].get("weights")
        if isinstance(card, dict):
            return card
    cfg = plan.config
    url = cfg.get("weights")
    return {"model": cfg.get("model"), "file": storage.basename(url) if url else None, "url": url,
            "sha256": cfg.get("weights_sha256"), "origin": None, "trained_on": None, "caveat": None,
            "training_range": None}


def outside_training_range_summary(records: dict[int, dict[str, Any]], weights: dict[str, Any]) -> dict[str, Any]:
    """Rows predicted outside the weights' training range, from the rank records: ``{"rows", "n_partitions",
    "partitions", "by_partition", "range", "known"}`` (``range`` None and ``known`` False when the weights state
    no training range: then nothing is flagged)."""
    rows, parts = 0, {}
    for rank in sorted(records):
        counts = records[rank].get("outside_training_range")
        if not isinstance(counts, dict):  # a rank recorded before predictions were range-checked
            continue
        rows += int(counts.get("rows") or 0)
        for name, count in (counts.get("by_partition") or {}).items():
            parts[name] = parts.get(name, 0) + int(count)
    rng = weights.get("training_range")
    named = list(parts)[:NAMED_PARTITIONS]
    return {"rows": rows, "n_partitions": len(parts), "partitions": named,
            "by_partition": {name: parts[name] for name in named},
            "range": [rng["z_min"], rng["z_max"]] if isinstance(rng, dict) else None,
            "known": isinstance(rng, dict)}


def _write(result_url: str, records: dict[int, dict[str, Any]], gathered: _Gathered) -> None:
    """combined_data.json (the records, the original's keys first) and predictions.parquet (committed)."""
    ordered = [_original_first(records[r]) for r in sorted(records)]
    storage.write_json(RunFolder(result_url).combined, _clean(ordered))
    if gathered.out is not None:
        gathered.out.commit()
    else:
        storage.remove(RunFolder(result_url).predictions)


class IdCounter:
    """Object ids repeated across the run's predictions, counted exactly in 8 bytes a row (one int64 array,
    sorted in place at the end): ``{"ids": distinct ids seen more than once, "rows": rows beyond the first of
    each, "examples": up to 5 such ids}``."""

    def __init__(self, capacity: int = 0) -> None:
        import numpy as np

        self._ids = np.empty(max(int(capacity), 0), dtype=np.int64)
        self._n = 0

    def add(self, ids: Any) -> None:
        import numpy as np

        ids = np.asarray(ids, dtype=np.int64)
        self._ids = append_grown(self._ids, self._n, ids)
        self._n += ids.size

    def result(self) -> dict[str, Any]:
        import numpy as np

        ids = self._ids[:self._n]
        ids.sort()
        repeat = ids[1:] == ids[:-1]
        rows = int(np.count_nonzero(repeat))
        first = repeat & ~np.concatenate(([False], repeat[:-1])) if rows else repeat
        examples = ids[1:][first][:5].tolist() if rows else []
        out = {"ids": int(np.count_nonzero(first)) if rows else 0, "rows": rows, "examples": examples}
        self._ids = np.empty(0, dtype=np.int64)
        return out


#: Rows per row group of predictions.parquet: pyarrow's default, so the layout is the one ``write_table`` made.
ROW_GROUP_ROWS = 1024 * 1024
#: Rank outputs read ahead of the one being appended (bounds memory and outstanding requests on S3) ...
READ_AHEAD = 32
#: ... by this many threads.
READ_THREADS = 16
#: Partitions named in ``nonfinite_predictions`` (the count of all of them is given too).
NAMED_PARTITIONS = 20


class _NewColumn(Exception):
    """A rank's table has an output column that the ranks before it lacked; ``columns``: all seen so far."""

    def __init__(self, columns: dict[str, Any]) -> None:
        super().__init__(sorted(columns))
        self.columns = columns


def _dictionary_type() -> Any:
    import pyarrow as pa

    return pa.dictionary(pa.int32(), pa.string())


class _Gathered:
    """One pass over the ranks' predictions in rank order: the completeness checks, the streamed
    ``predictions.parquet`` (``out``, committed by the caller) and the metrics and non-finite counts.

    ``columns`` (name -> Arrow type) fixes the output schema; None takes it from the first readable rank."""

    def __init__(self, plan: Plan, records: dict[int, dict[str, Any]], columns: dict[str, Any] | None,
                 reader: "storage.BulkReader") -> None:
        self.plan, self.records, self.columns, self.reader = plan, records, columns, reader
        self.problems: list[str] = []
        self.part_done: dict[str, int] = {}
        self.unreadable: list[int] = []
        self.rows_in = self.rows_out = 0
        self.out: storage.StreamedParquet | None = None
        self.metrics: MetricsAccumulator | None = None
        self.capacity = sum(int(r.get("rows") or 0) for r in records.values())  # rows the records announce
        self.ids = IdCounter(capacity=self.capacity)
        self.nonfinite_parts: dict[str, int] = {}
        self.nonfinite_rows = 0
        self.nonfinite_from_finite = 0
        self._buffer: list[Any] = []
        self._buffered = 0
        self.catalog_fields: list[Any] | None = None
        self.catalog_rank: int | None = None

    def run(self) -> None:
        import pyarrow as pa

        plan, records = self.plan, self.records
        order = sorted(records)
        urls = [RunFolder(plan.result_url).prediction(rank) for rank in order]
        with contextlib.closing(storage.read_ahead(self.reader.read_table, urls, READ_AHEAD, READ_THREADS)) as tables:
            for rank, url, table in zip(order, urls, tables):
                rec = records[rank]
                try:
                    if isinstance(table, BaseException):
                        raise table
                    counts = _partition_counts(table)
                    catalog = self._catalog(rank, url, table)
                    table = self._conform(table, catalog)
                except (pa.ArrowException, OSError, CaiError) as exc:
                    if isinstance(exc, CatalogMismatchError):
                        raise
                    self.problems.append(f"rank {rank}: {url} is unreadable ({exc}); a rerun redoes this rank")
                    self.unreadable.append(rank)
                    continue
                self._check(rank, rec, counts)
                self.rows_out += table.num_rows
                self._score(rec, table)
                self._append(table)
        self._flush(final=True)

    def _check(self, rank: int, rec: dict[str, Any], counts: dict[str, int]) -> None:
        """The rank processed the partitions the plan assigns it, each with rows in == rows out."""
        plan = self.plan
        names = [p["name"] for p in plan.tasks[rank]]
        if rec.get("partitions") != names:
            self.problems.append(f"rank {rank} processed {rec.get('partitions')} but the plan assigns {names}")
        for p in plan.tasks[rank]:
            expected = p["rows"] if p.get("rows") is not None else rec.get("partition_rows", {}).get(p["name"])
            got = int(counts.get(p["name"], 0))
            self.rows_in += int(expected or 0)
            if expected is None or got != int(expected):
                self.problems.append(f"partition {p['name']} (rank {rank}): {expected} rows in, {got} rows out")
            self.part_done[p["name"]] = self.part_done.get(p["name"], 0) + 1

    # -- the output schema ------------------------------------------------------------------------------
    def _catalog(self, rank: int, url: str, table: Any) -> list[Any]:
        """The rank's catalogue columns (the fields after the standard ones), which must be those of the first
        rank read, in name, order and type: otherwise a CatalogMismatchError naming the rank."""
        fields = [f for f in table.schema if f.name not in PREDICTION_COLUMNS]
        if self.catalog_fields is None:
            self.catalog_fields, self.catalog_rank = fields, rank
        elif [(f.name, f.type) for f in fields] != [(f.name, f.type) for f in self.catalog_fields]:
            raise CatalogMismatchError(
                f"rank {rank}: {url} has catalogue columns {_field_list(fields)} but rank {self.catalog_rank} has "
                f"{_field_list(self.catalog_fields)}; the dataset's partitions must carry the same columns (convert "
                "the data again with one catalogue, then rerun with --overwrite)")
        return fields

    def _conform(self, table: Any, catalog: list[Any] = ()) -> Any:
        """``table`` with the output columns in order and types (partition as dictionary<int32, string>), then its
        ``catalog`` columns; standard columns a rank lacks are null (as ``concat_tables(promote_options="default")``
        made them)."""
        import pyarrow as pa

        present = {name: table.schema.field(name).type for name in PREDICTION_COLUMNS if name in table.column_names}
        if "partition" in present:
            present["partition"] = _dictionary_type()
        if self.columns is None:
            self.columns = present
        elif set(present) - set(self.columns):
            raise _NewColumn({name: self.columns.get(name, present.get(name)) for name in PREDICTION_COLUMNS
                              if name in self.columns or name in present})
        arrays = []
        for name, typ in self.columns.items():
            if name not in present:
                arrays.append(pa.chunked_array([pa.nulls(table.num_rows, typ)], type=typ))
            elif name == "partition":
                arrays.append(_as_dictionary(table.column(name)))
            else:
                col = table.column(name)
                arrays.append(col if col.type == typ else col.cast(typ))
        arrays += [table.column(f.name) for f in catalog]
        schema = pa.schema([pa.field(name, typ) for name, typ in self.columns.items()] + list(catalog))
        return pa.Table.from_arrays(arrays, schema=schema)

    # -- metrics and non-finite predictions -------------------------------------------------------------
    def _score(self, rec: dict[str, Any], table: Any) -> None:
        import numpy as np

        if "object_id" in table.column_names:
            self.ids.add(table.column("object_id").to_numpy())
        if "z_pred" not in table.column_names:
            return
        zp = table.column("z_pred").to_numpy()
        if "z_true" in table.column_names:
            if self.metrics is None:
                self.metrics = MetricsAccumulator(capacity=self.capacity)
            self.metrics.add(zp, table.column("z_true").to_numpy(), _flags(table))
        bad = ~np.isfinite(zp)
        n_bad = int(np.count_nonzero(bad))
        if not n_bad:
            return
        self.nonfinite_rows += n_bad
        from_finite = rec.get("nonfinite_predictions")
        if isinstance(from_finite, dict):  # the worker counted the rows whose inputs were finite
            self.nonfinite_from_finite += sum(int(v) for v in from_finite.values())
        elif "flag" in table.column_names:  # older records: the unflagged rows
            flag = table.column("flag").to_numpy()
            self.nonfinite_from_finite += int(np.count_nonzero(bad & ~np.asarray(flag, dtype=bool)))
        if "partition" in table.column_names:
            where = np.flatnonzero(bad)
            for name, count in _value_counts(table.column("partition").take(where)).items():
                self.nonfinite_parts[name] = self.nonfinite_parts.get(name, 0) + count

    def nonfinite_summary(self) -> dict[str, Any]:
        """``{"rows", "from_finite_inputs", "n_partitions", "partitions"}``: rows whose prediction is NaN/inf,
        how many of them had finite inputs (the model overflowed), and the partitions holding them (the first
        ``NAMED_PARTITIONS`` in plan order, with their counts in ``by_partition``)."""
        named = list(self.nonfinite_parts)[:NAMED_PARTITIONS]
        return {"rows": self.nonfinite_rows, "from_finite_inputs": self.nonfinite_from_finite,
                "n_partitions": len(self.nonfinite_parts), "partitions": named,
                "by_partition": {name: self.nonfinite_parts[name] for name in named}}

    # -- streaming the output ---------------------------------------------------------------------------
    def _append(self, table: Any) -> None:
        if self.out is None:
            self.out = storage.StreamedParquet(RunFolder(self.plan.result_url).predictions, table.schema, ROW_GROUP_ROWS)
        if table.num_rows:
            self._buffer.append(table)
            self._buffered += table.num_rows
            if self._buffered >= ROW_GROUP_ROWS:
                self._flush(final=False)

    def _flush(self, final: bool) -> None:
        """Write whole row groups of ``ROW_GROUP_ROWS`` (the rest too when ``final``), one dictionary each."""
        import pyarrow as pa

        if not self._buffer or self.out is None:
            return
        table = pa.concat_tables(self._buffer) if len(self._buffer) > 1 else self._buffer[0]
        self._buffer, self._buffered = [], 0
        while table.num_rows >= ROW_GROUP_ROWS or (final and table.num_rows):
            group = table.slice(0, ROW_GROUP_ROWS)
            self.out.write(group.unify_dictionaries().combine_chunks())
            table = table.slice(group.num_rows)
        if table.num_rows:
            self._buffer, self._buffered = [table], table.num_rows

    def abort(self) -> None:
        """Discard a predictions file being written (the old one, if any, stays as it was)."""
        if self.out is not None:
            self.out.abort()
            self.out = None


def _as_dictionary(col: Any) -> Any:
    """A partition column as dictionary<int32, string> chunks (never recast to one string per row)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    want = _dictionary_type()
    chunks = []
    for chunk in col.chunks:
        if chunk.type == want:
            chunks.append(chunk)
        elif pa.types.is_dictionary(chunk.type):
            chunks.append(chunk.cast(want))
        else:
            chunks.append(pc.dictionary_encode(chunk.cast(pa.string())).cast(want))
    return pa.chunked_array(chunks, type=want)


def _value_counts(col: Any) -> dict[str, int]:
    """``value -> rows`` of a (dictionary) string column, summed over its chunks."""
    import pyarrow.compute as pc

    out: dict[str, int] = {}
    for chunk in col.chunks if hasattr(col, "chunks") else [col]:
        if not len(chunk):
            continue
        vc = pc.value_counts(chunk)
        for value, count in zip(vc.field("values").to_pylist(), vc.field("counts").to_pylist()):
            out[value] = out.get(value, 0) + int(count)
    return out


def _flags(table: Any) -> Any:
    """The ``flag`` column as a numpy bool array (null, from ranks written without it, is unflagged), or None."""
    import pyarrow.compute as pc

    if "flag" not in table.column_names:
        return None
    return pc.fill_null(table.column("flag"), False).to_numpy(zero_copy_only=False)


def _partition_counts(table: Any) -> dict[str, int]:
    if not table.num_rows:
        return {}
    if "partition" not in table.column_names:
        raise DataError("no 'partition' column")
    return _value_counts(table.column("partition"))


def _original_first(rec: dict[str, Any]) -> dict[str, Any]:
    out = {k: rec[k] for k in ORIGINAL_KEYS if k in rec}
    out.update({k: v for k, v in rec.items() if k not in out})
    return out


def _timing(plan: Plan, records: dict[int, dict[str, Any]], rows_out: int) -> dict[str, Any]:
    recs = list(records.values())
    busy = _busy_seconds(recs) if recs else 0.0
    run_url = RunFolder(plan.result_url).run
    run_info = storage.read_json(run_url) if storage.exists(run_url) else {}
    stage = dict(run_info.get("stages", {})) if run_info.get("plan_hash") == plan.plan_hash else {}
    # The backend-measured map stage includes worker start-up; use it when that run did every rank.
    if stage.get("map_s") and set(run_info.get("ranks_run", [])) >= set(records) and records:
        map_s, source = float(stage["map_s"]), "backend map stage (includes worker start-up)"
    else:
        map_s, source = busy, "union of task intervals"
    bits = rows_out * INPUT_BITS_PER_SAMPLE
    phases_total = {p: sum(float(r.get("phases", {}).get(p, 0.0)) for r in recs) for p in PHASES}
    workers: dict[str, dict[str, Any]] = defaultdict(lambda: {"tasks": 0, "rows": 0, "task_seconds": 0.0})
    for r in recs:
        cpu = r.get("cpu", {})
        w = workers[f"{cpu.get('host', '?')}:{cpu.get('pid', '?')}"]
        w["tasks"] += 1
        w["rows"] += int(r.get("rows", 0))
        w["task_seconds"] += float(r.get("total_cpu_time (seconds)", 0.0))
    for w in workers.values():
        s = w["task_seconds"]
        w["samples_per_s"] = w["rows"] / s if s > 0 else None
        w["throughput_bps"] = w["rows"] * INPUT_BITS_PER_SAMPLE / s if s > 0 else None
    return {
        "stages": stage,
        "map_wall_s": map_s, "map_wall_source": source, "task_busy_s": busy,
        "rows": rows_out, "input_bits": bits,
        "throughput_bps": bits / map_s if map_s > 0 else None,
        "samples_per_s": rows_out / map_s if map_s > 0 else None,
        "phases_total_s": phases_total,
        "phases_mean_s": {p: v / len(recs) for p, v in phases_total.items()} if recs else {},
        "cold_starts": sum(1 for r in recs if r.get("cold_start")),
        "workers": dict(sorted(workers.items())),
        "peak_rss_mb": max((float(r.get("peak_rss_mb", 0.0)) for r in recs), default=None),
        "nonfinite_rows": sum(int(r.get("nonfinite_rows", 0)) for r in recs),
        "out_of_range_rows": sum(int(r.get("out_of_range_rows", 0)) for r in recs),
    }


def _modes_used(plan: Plan, records: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """The mode each rank predicted in, and the fast-mode guard's measurements (max |dz| over the ranks)."""
    used = sorted({str(r.get("mode_used") or r.get("mode")) for r in records.values()})
    out: dict[str, Any] = {"mode_used": used[0] if len(used) == 1 else used}
    checks = {rank: r["fast_check"] for rank, r in records.items() if isinstance(r.get("fast_check"), dict)}
    if plan.config.get("mode") == "fast":
        measured = [c["max_dz"] for c in checks.values() if c.get("max_dz") is not None]
        out["fast_check"] = {
            "policy": plan.config.get("fast_guard") or "fallback",
            "tolerance": next((c["tolerance"] for c in checks.values()), None),
            "max_dz": max(measured) if measured else None,
            "rows_compared": sum(int(c.get("rows", 0)) for c in checks.values()),
            "ranks_in_exact": sorted(rank for rank, c in checks.items() if c.get("mode_used") == "exact"),
            "seconds": sum(float(c.get("seconds", 0.0)) for c in checks.values()),
        }
    return out


def incomplete_message(summary: dict[str, Any]) -> str:
    """One line naming what is missing or failed in an incomplete run."""
    comp = summary["completeness"]
    parts = [f"{summary['result_url']}: run incomplete"]
    if comp["missing_ranks"]:
        parts.append(f"missing ranks {comp['missing_ranks']}")
    for f in summary["failures"]:
        parts.append(f"rank {f['rank']} failed ({f['error_type']}: {f['message']})")
    parts.extend(comp["problems"][:5])
    damaged = sorted({f.get("damaged_partition") or "?" for f in summary["failures"] if f.get("remedy") == "restore"})
    if damaged:
        return "; ".join(parts) + (f"; restore the changed or damaged partition(s) {damaged[:5]} from the dataset's "
                                   "source first (a rerun alone fails the same way), then rerun `cai run` with the "
                                   "same config to resume the missing ranks")
    return "; ".join(parts) + "; rerun `cai run` with the same config to resume the missing ranks"
