"""Stage 1, plan: list the dataset's partitions, assign them to ranks and write ``plan.json`` + ``tasks.json``.

The plan lives under the run's result URL (no global payload file), so two runs never collide, and its hash
(sha256 of the canonical JSON of the plan config and the partition list) lets a rerun resume.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from typing import Any

from .. import storage
from ..config import RunConfig
from ..errors import CaiError, ConfigError, DataError, StorageError
from ..results import RESULT_DIRS, RunFolder

#: The plan hash alone: what a worker reads to know its task still belongs to the plan under the result path.
PLAN_FORMAT = "cosmicai-plan"
PLAN_VERSION = 2  # 2: each partition stored once; tasks are index lists into "partitions"
#: One line per rank, ``<sha256 of the rank's task item>\n`` (``-`` x 64 for a rank without a task): a worker reads
#: its own line with one ranged read and checks the task item it was handed against it (:func:`verify_task_item`).
_DIGEST_LINE = 65
_NO_TASK = "-" * 64


def assign_ranks(n_files: int, world_size: int) -> list[list[int]]:
    """The original CAI rule: rank r takes ceil(files left / ranks left); ranks beyond the files get none."""
    if n_files < 0 or world_size < 1:
        raise ConfigError(f"assign_ranks: need n_files >= 0 and world_size >= 1, got {n_files}, {world_size}")
    out: list[list[int]] = []
    start = 0
    for rank in range(world_size):
        take = math.ceil((n_files - start) / (world_size - rank))
        out.append(list(range(start, start + take)))
        start += take
    return out


@dataclass
class Plan:
    """A written plan: the config it came from, its partitions and which rank takes which."""

    result_url: str
    plan_hash: str
    config: dict[str, Any]
    partitions: list[dict[str, Any]]
    tasks: dict[int, list[dict[str, Any]]]
    world_size: int
    created_at: str = ""
    #: Settings that do not change results (so they stay out of the hash), e.g. prefetch.
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def data_url(self) -> str:
        return self.config["data"]

    @property
    def ranks(self) -> list[int]:
        """Ranks that have at least one partition (the tasks to run)."""
        return sorted(r for r, parts in self.tasks.items() if parts)

    def task_list(self) -> list[dict[str, Any]]:
        """The backend task items, one per rank with partitions. Each is self-contained (``result_url``, ``rank``,
        ``plan_hash`` and ``task``: the run config, options and the rank's own partitions), so a worker reads
        neither plan.json nor tasks.json; it checks the plan hash against ``plan_hash.json`` (a few bytes)."""
        return [{"result_url": self.result_url, "rank": r, "plan_hash": self.plan_hash,
                 "task": {"config": self.config, "options": self.options, "world_size": self.world_size,
                          "partitions": self.tasks[r]}} for r in self.ranks]

    @classmethod
    def for_task(cls, result_url: str, rank: int, plan_hash: str, task: dict[str, Any]) -> "Plan":
        """The view of the plan one task item carries (its own rank only)."""
        try:
            return cls(result_url=result_url, plan_hash=plan_hash, config=task["config"],
                       partitions=list(task["partitions"]), tasks={int(rank): list(task["partitions"])},
                       world_size=int(task["world_size"]), options=dict(task.get("options") or {}))
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"task item for rank {rank} of {result_url} is malformed ({exc!r})") from exc

    @property
    def total_rows(self) -> int | None:
        """Planned input rows, or None when some partition's row count is unknown until decoded."""
        rows = [p.get("rows") for p in self.partitions]
        return None if any(r is None for r in rows) else int(sum(rows))

    def to_dict(self) -> dict[str, Any]:
        index = {p["name"]: i for i, p in enumerate(self.partitions)}
        return {"format": PLAN_FORMAT, "version": PLAN_VERSION, "plan_hash": self.plan_hash,
                "created_at": self.created_at, "result_url": self.result_url, "world_size": self.world_size,
                "config": self.config, "options": self.options, "partitions": self.partitions,
                "tasks": {str(r): [index[p["name"]] for p in parts] for r, parts in sorted(self.tasks.items())}}

    @classmethod
    def from_dict(cls, raw: Any, result_url: str, source: str) -> "Plan":
        if not isinstance(raw, dict) or raw.get("format") != PLAN_FORMAT:
            raise DataError(f"{source}: not a cosmicai plan")
        try:
            parts = raw["partitions"]
            if int(raw.get("version", 1)) >= 2:
                tasks = {int(r): [parts[int(i)] for i in idx] for r, idx in raw["tasks"].items()}
            else:
                tasks = {int(r): ps for r, ps in raw["tasks"].items()}
            return cls(result_url=result_url, plan_hash=raw["plan_hash"], config=raw["config"],
                       partitions=parts, world_size=int(raw["world_size"]), tasks=tasks,
                       created_at=raw.get("created_at", ""), options=dict(raw.get("options") or {}))
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
            raise DataError(f"{source}: malformed plan ({exc!r})") from exc


def plan_hash(config: dict[str, Any], partitions: list[dict[str, Any]]) -> str:
    """sha256 of the canonical JSON of the plan config and the partition list."""
    canon = json.dumps({"config": config, "partitions": partitions}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canon.encode()).hexdigest()


def _partition_dicts(config: RunConfig) -> list[dict[str, Any]]:
    from ..data.partition import list_partitions

    refs = list_partitions(config.data)  # raises, naming the convert command that fits, when there are none
    parts = [{"name": r.name, "url": r.url, "rows": getattr(r, "rows", None), "bytes": getattr(r, "bytes", None),
              "sha256": getattr(r, "sha256", None)} for r in refs]
    if config.file_limit is not None:
        if config.file_limit > len(parts):
            raise ConfigError(f"file_limit is {config.file_limit} but only {len(parts)} partition(s) are available "
                              f"under {config.data}")
        parts = parts[:config.file_limit]
    for ref, p in zip(refs, parts):
        if not p["sha256"]:  # no checksum to verify: the listing's fingerprint notices a replaced file
            p["fingerprint"] = ref.fingerprint
    return parts


def plan_contents(config: RunConfig) -> tuple[dict[str, Any], list[dict[str, Any]], str]:
    """What ``config`` plans, without writing anything: (plan config, partitions, plan hash).

    The plan config holds the weights' sha256, so weights rewritten in place change the plan."""
    from ..models import check_model_name
    from ..models.registry import weights_sha256

    try:
        check_model_name(config.model)  # before any partition is listed or worker started
    except CaiError as exc:
        raise ConfigError(f"model: {exc}") from exc
    parts = _partition_dicts(config)
    cfg = config.plan_dict()
    cfg["world_size"] = config.world_size or len(parts)
    try:
        cfg["weights_sha256"] = weights_sha256(config.model, config.weights)
    except CaiError as exc:
        raise ConfigError(f"weights: {exc}") from exc
    return cfg, parts, plan_hash(cfg, parts)


def make_plan(config: RunConfig, contents: tuple[dict[str, Any], list[dict[str, Any]], str] | None = None) -> Plan:
    """List partitions, assign ranks, and write ``plan.json`` and ``tasks.json`` under ``config.result``.

    Re-planning with the same config keeps the existing plan (same hash, so completed ranks are resumed); a
    different config into a result URL that already holds a run is a ConfigError unless ``config.overwrite``.
    ``contents``: :func:`plan_contents` already computed for ``config`` (saves listing the dataset twice).
    """
    cfg, parts, digest = contents or plan_contents(config)
    world = cfg["world_size"]
    result = config.result
    options = {"prefetch": bool(config.prefetch)}
    existing = _existing_plan(result)
    if existing is not None and existing.plan_hash == digest and not config.overwrite:
        if existing.options != options:
            existing.options = options
            storage.write_json(RunFolder(result).plan, existing.to_dict())
        _write_tasks(existing)
        return existing
    if existing is not None and not config.overwrite and _same_config(existing.config, cfg, config.world_size is None):
        _dataset_changed(existing, parts)
    if existing is not None or _has_outputs(result):
        if not config.overwrite:
            if existing is None:
                raise ConfigError(f"{result} already holds files in {'/'.join(RESULT_DIRS)} but no plan.json, so they "
                                  f"are not a cosmicai run's outputs ({', '.join(_foreign_files(result, None)[:5])}); "
                                  "use another result path or remove them")
            raise ConfigError(f"{result} already holds a run with a different config "
                              f"({_config_diff(existing.config, cfg)}); use another result path or --overwrite to "
                              "replace it")
        clear_results(result, existing)
    # Ranks past the partition count would get none: the rule gives the same assignment over min(world, files)
    # ranks, and the empty ranks are never materialised (a world size of 10^6 on 3 partitions costs nothing).
    assignment = assign_ranks(len(parts), min(world, len(parts)))
    plan = Plan(result_url=result, plan_hash=digest, config=cfg, partitions=parts, world_size=world,
                tasks={r: [parts[i] for i in idx] for r, idx in enumerate(assignment)},
                created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), options=options)
    storage.write_json(RunFolder(result).plan, plan.to_dict(), indent=None)
    storage.write_json(RunFolder(result).plan_hash, {"plan_hash": plan.plan_hash})
    _write_tasks(plan)
    return plan


def current_plan_hash(result_url: str) -> str | None:
    """The hash of the plan now under ``result_url`` (from the small plan_hash.json, else plan.json)."""
    url = RunFolder(result_url).plan_hash
    if storage.exists(url):
        raw = storage.read_json(url)
        return raw.get("plan_hash") if isinstance(raw, dict) else None
    return load_plan(result_url).plan_hash


def _same_config(old: dict[str, Any], new: dict[str, Any], default_world: bool) -> bool:
    # A default world_size follows the partition count, so it changes with the dataset itself.
    skip = {"world_size"} if default_world else set()
    return {k: v for k, v in old.items() if k not in skip} == {k: v for k, v in new.items() if k not in skip}


def _dataset_changed(plan: Plan, parts: list[dict[str, Any]]) -> None:
    """Same config, different partitions: say which partitions went missing, appeared or changed."""
    now = {p["name"]: p for p in parts}
    before = {p["name"] for p in plan.partitions}
    added = [n for n in now if n not in before]
    missing = [p["name"] for p in plan.partitions if p["name"] not in now]
    if missing:
        gone = _not_listed(plan.data_url, missing)
        if gone or not added:
            raise DataError(f"{plan.data_url}: partition(s) {', '.join(gone or missing)} planned in "
                            f"{RunFolder(plan.result_url).plan} are missing from the dataset (deleted or "
                            f"moved after planning); restore them to resume, or use --overwrite to plan anew")
        # Still there: files added since planning sort before them and take their place within file_limit.
        raise ConfigError(f"{plan.data_url}: partition(s) {', '.join(added)} were added to the dataset since "
                          f"{plan.result_url} was planned and now come before planned partition(s) "
                          f"{', '.join(missing)} (file_limit {plan.config.get('file_limit')} takes the first files in "
                          f"name order); resuming would mix two selections of files: move the new files away, or "
                          f"use --overwrite to plan anew, or another result path")
    changed = [p["name"] for p in plan.partitions if p != now[p["name"]]]
    if not added and not changed:
        return  # the partitions are the same: the config differs, reported by the caller
    raise ConfigError(f"{plan.data_url}: the dataset changed since {plan.result_url} was planned "
                      f"(new: {added or 'none'}, changed: {changed or 'none'}; a changed partition has another size, "
                      f"checksum or modification time, e.g. a file replaced by one of the same name); resuming would "
                      f"mix rows of old and new data: restore the files, or use --overwrite to plan anew, or another "
                      f"result path")


def _not_listed(data_url: str, names: list[str]) -> list[str]:
    """Those of ``names`` the whole dataset (before ``file_limit``) no longer lists."""
    from ..data.partition import list_partitions

    try:
        listed = {r.name for r in list_partitions(data_url)}
    except DataError:
        return list(names)
    return [n for n in names if n not in listed]


def _write_tasks(plan: Plan) -> None:
    """``task_digests.txt`` (when it differs), then ``tasks.json``: a task item is never out before its digest."""
    tasks = plan.task_list()
    digests = task_digests(tasks)
    url = RunFolder(plan.result_url).task_digests
    if not storage.exists(url) or storage.read_bytes(url) != digests:
        storage.write_bytes(url, digests)
    url = RunFolder(plan.result_url).tasks
    if not storage.exists(url) or storage.read_json(url) != tasks:
        storage.write_json(url, tasks, indent=None)


def task_digest(item: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of one task item (:meth:`Plan.task_list`): result URL, rank, plan hash, task."""
    try:
        canon = json.dumps(item, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"task item for rank {item.get('rank')!r} is not plain JSON ({exc})") from exc
    return hashlib.sha256(canon.encode()).hexdigest()


def task_digests(items: list[dict[str, Any]]) -> bytes:
    """The ``task_digests.txt`` of a task list: line r is the digest of rank r's item."""
    by_rank = {int(item["rank"]): task_digest(item) for item in items}
    lines = [by_rank.get(r, _NO_TASK) for r in range(max(by_rank) + 1 if by_rank else 0)]
    return "".join(line + "\n" for line in lines).encode()


def stored_task_digest(result_url: str, rank: int) -> str | None:
    """Rank ``rank``'s line of ``task_digests.txt`` (one ranged read), or None when the plan has no task for it.

    DataError when the result URL holds no digests (no plan made by this version)."""
    url = RunFolder(result_url).task_digests
    size = storage.size(url)
    if size is None:
        raise DataError(f"{url}: no task digests (plan the run first; a plan made before task digests existed is "
                        "renewed by planning it again)")
    start = int(rank) * _DIGEST_LINE
    if start + _DIGEST_LINE > size:
        return None
    fs, path = storage.filesystem(url)
    try:
        line = fs.cat_file(path, start=start, end=start + _DIGEST_LINE)
    except Exception as exc:  # noqa: BLE001 - fsspec and botocore raise many types; one line names the file
        raise StorageError(f"cannot read {url}: {type(exc).__name__}: {exc}") from exc
    text = line.decode("ascii", "replace").rstrip("\n")
    return None if text == _NO_TASK else text


def verify_task_item(item: dict[str, Any]) -> None:
    """Refuse (ConfigError, nothing written) a task item that is not the one the plan under its result URL wrote
    for its rank: a rank the plan does not have, a task changed in any field, an item of another plan."""
    result_url, rank, digest = item["result_url"], item["rank"], item["plan_hash"]
    now = current_plan_hash(result_url)
    if now != digest:
        raise ConfigError(f"{result_url}: this task item belongs to plan {str(digest)[:12]} but the plan there is "
                          f"{str(now)[:12]} (an item of an older or another plan); rank {rank} was not run")
    check_task_digest(item)


def check_task_digest(item: dict[str, Any]) -> None:
    """Refuse (ConfigError) an item whose rank the plan does not have or whose task differs from what the plan
    wrote for that rank (``task_digests.txt``); the caller has checked the plan hash."""
    result_url, rank = item["result_url"], item["rank"]
    stored = stored_task_digest(result_url, rank)
    if stored is None:
        raise ConfigError(f"{result_url}: rank {rank} is not in the plan ({_planned_ranks(result_url)}); "
                          "nothing was run or written")
    if task_digest(item) != stored:
        raise ConfigError(f"{result_url}: the task item for rank {rank} differs from the one the plan wrote "
                          f"({RunFolder(result_url).tasks}); only the plan's own items are run")


def _planned_ranks(result_url: str) -> str:
    count = (storage.size(RunFolder(result_url).task_digests) or 0) // _DIGEST_LINE
    return f"ranks 0-{count - 1}" if count else "no ranks"


def _existing_plan(result_url: str) -> Plan | None:
    url = RunFolder(result_url).plan
    if not storage.exists(url):
        return None
    return Plan.from_dict(storage.read_json(url), result_url, url)


def _has_outputs(result_url: str) -> bool:
    return any(storage.list_files(d) for d in RunFolder(result_url).dirs())


def _config_diff(old: dict[str, Any], new: dict[str, Any]) -> str:
    """``key: old -> new`` for each plan-config key that differs (digests shortened)."""
    def show(v: Any) -> str:
        return f"{v[:12]}..." if isinstance(v, str) and len(v) == 64 else repr(v)

    keys = sorted(set(old) | set(new))
    diffs = [f"{k}: {show(old.get(k))} -> {show(new.get(k))}" for k in keys if old.get(k) != new.get(k)]
    return "changed " + "; ".join(diffs) if diffs else "the partitions differ"


def _own_files(result_url: str, plan: Plan | None) -> set[str]:
    """The files a run with ``plan`` writes under ``result_url``."""
    folder = RunFolder(result_url)
    own = set(folder.files())
    # The shared fast-mode checks, one file per (weights, engine, CPU) key: any run on this path wrote them.
    own |= {u for u in storage.list_files(folder.fast_check_dir) if u.endswith(".json")}
    if plan is not None:
        for rank in plan.tasks:
            own |= {folder.record(rank), folder.prediction(rank), folder.error(rank)}
    return own


def _foreign_files(result_url: str, plan: Plan | None) -> list[str]:
    """Files in the result folders that the run with ``plan`` did not write."""
    own = _own_files(result_url, plan)
    found = [u for d in RunFolder(result_url).dirs() for u in storage.list_files(d, recursive=True)]
    return [u for u in found if u not in own]


def clear_results(result_url: str, plan: Plan | None = None) -> None:
    """Remove what the run with ``plan`` wrote under ``result_url``, and nothing else.

    Refuses (ConfigError naming the files) when the result folders hold anything that run did not write, and when
    the result path holds a dataset (a manifest or partition files): ``--overwrite`` never deletes data."""
    from ..data.formats import MANIFEST_NAME
    from ..data.partition import PARTITION_SUFFIXES

    if storage.exists(storage.join(result_url, MANIFEST_NAME)) or storage.list_files(
            result_url, suffixes=PARTITION_SUFFIXES):
        raise ConfigError(f"{result_url} holds a dataset (manifest.json or partition files); --overwrite never "
                          "deletes data: choose another result path")
    foreign = _foreign_files(result_url, plan)
    if foreign:
        raise ConfigError(f"{result_url}: --overwrite removes only what the previous run wrote, but "
                          f"{len(foreign)} other file(s) are there: {', '.join(foreign[:10])}; move them away first")
    for url in sorted(_own_files(result_url, plan)):
        storage.remove(url)


def load_plan(result_url: str) -> Plan:
    """Read the plan written by :func:`make_plan`; DataError when there is none."""
    url = RunFolder(result_url).plan
    if not storage.exists(url):
        raise DataError(f"{url}: no plan found (run `cai run` or make_plan first)")
    return Plan.from_dict(storage.read_json(url), result_url, url)
