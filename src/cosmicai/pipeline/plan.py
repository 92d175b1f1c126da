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
from ..errors import CaiError, ConfigError, DataError

PLAN_NAME = "plan.json"
TASKS_NAME = "tasks.json"
PLAN_FORMAT = "cosmicai-plan"
PLAN_VERSION = 1
#: Everything a run writes under its result URL (removed by ``overwrite``).
RESULT_FILES = ("plan.json", "tasks.json", "run.json", "combined_data.json", "predictions.parquet", "summary.json")
RESULT_DIRS = ("ranks", "predictions", "errors")


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
        """The backend task items: ``[{"result_url": ..., "rank": r}, ...]``."""
        return [{"result_url": self.result_url, "rank": r} for r in self.ranks]

    @property
    def total_rows(self) -> int | None:
        """Planned input rows, or None when some partition's row count is unknown until decoded."""
        rows = [p.get("rows") for p in self.partitions]
        return None if any(r is None for r in rows) else int(sum(rows))

    def to_dict(self) -> dict[str, Any]:
        return {"format": PLAN_FORMAT, "version": PLAN_VERSION, "plan_hash": self.plan_hash,
                "created_at": self.created_at, "result_url": self.result_url, "world_size": self.world_size,
                "config": self.config, "options": self.options, "partitions": self.partitions,
                "tasks": {str(r): parts for r, parts in sorted(self.tasks.items())}}

    @classmethod
    def from_dict(cls, raw: Any, result_url: str, source: str) -> "Plan":
        if not isinstance(raw, dict) or raw.get("format") != PLAN_FORMAT:
            raise DataError(f"{source}: not a cosmicai plan")
        try:
            return cls(result_url=result_url, plan_hash=raw["plan_hash"], config=raw["config"],
                       partitions=raw["partitions"], world_size=int(raw["world_size"]),
                       tasks={int(r): parts for r, parts in raw["tasks"].items()},
                       created_at=raw.get("created_at", ""), options=dict(raw.get("options") or {}))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise DataError(f"{source}: malformed plan ({exc!r})") from exc


def plan_hash(config: dict[str, Any], partitions: list[dict[str, Any]]) -> str:
    """sha256 of the canonical JSON of the plan config and the partition list."""
    canon = json.dumps({"config": config, "partitions": partitions}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canon.encode()).hexdigest()


def _partition_dicts(config: RunConfig) -> list[dict[str, Any]]:
    from ..data.partition import list_partitions

    refs = list_partitions(config.data)
    if not refs:
        raise DataError(f"{config.data}: no partitions found (expected *.safetensors or *.pt files or a manifest.json)")
    parts = [{"name": r.name, "url": r.url, "rows": getattr(r, "rows", None), "bytes": getattr(r, "bytes", None),
              "sha256": getattr(r, "sha256", None)} for r in refs]
    if config.file_limit is not None:
        if config.file_limit > len(parts):
            raise ConfigError(f"file_limit is {config.file_limit} but only {len(parts)} partition(s) are available "
                              f"under {config.data}")
        parts = parts[:config.file_limit]
    return parts


def make_plan(config: RunConfig) -> Plan:
    """List partitions, assign ranks, and write ``plan.json`` and ``tasks.json`` under ``config.result``.

    Re-planning with the same config keeps the existing plan (same hash, so completed ranks are resumed); a
    different config into a result URL that already holds a run is a ConfigError unless ``config.overwrite``.
    """
    from ..models import check_model_name

    try:
        check_model_name(config.model)  # before any partition is listed or worker started
    except CaiError as exc:
        raise ConfigError(f"model: {exc}") from exc
    parts = _partition_dicts(config)
    world = config.world_size or len(parts)
    cfg = config.plan_dict()
    cfg["world_size"] = world
    digest = plan_hash(cfg, parts)
    result = config.result
    options = {"prefetch": bool(config.prefetch)}
    existing = _existing_plan(result)
    if existing is not None and existing.plan_hash == digest and not config.overwrite:
        if existing.options != options:
            existing.options = options
            storage.write_json(storage.join(result, PLAN_NAME), existing.to_dict())
        _write_tasks(existing)
        return existing
    if existing is not None and not config.overwrite and _same_config(existing.config, cfg, config.world_size is None):
        _dataset_changed(existing, parts)
    if existing is not None or _has_outputs(result):
        if not config.overwrite:
            why = ("a run with a different config" if existing is not None else "outputs of another run")
            raise ConfigError(f"{result} already holds {why} (plan hash "
                              f"{existing.plan_hash[:12] if existing else 'unknown'}, this config {digest[:12]}); "
                              f"use another result path or --overwrite to replace it")
        clear_results(result)
    assignment = assign_ranks(len(parts), world)
    plan = Plan(result_url=result, plan_hash=digest, config=cfg, partitions=parts, world_size=world,
                tasks={r: [parts[i] for i in idx] for r, idx in enumerate(assignment)},
                created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), options=options)
    storage.write_json(storage.join(result, PLAN_NAME), plan.to_dict())
    _write_tasks(plan)
    return plan


def _same_config(old: dict[str, Any], new: dict[str, Any], default_world: bool) -> bool:
    # A default world_size follows the partition count, so it changes with the dataset itself.
    skip = {"world_size"} if default_world else set()
    return {k: v for k, v in old.items() if k not in skip} == {k: v for k, v in new.items() if k not in skip}


def _dataset_changed(plan: Plan, parts: list[dict[str, Any]]) -> None:
    """Same config, different partitions: say which partitions went missing, appeared or changed."""
    now = {p["name"]: p for p in parts}
    missing = [p["name"] for p in plan.partitions if p["name"] not in now]
    if missing:
        raise DataError(f"{plan.data_url}: partition(s) {', '.join(missing)} planned in "
                        f"{storage.join(plan.result_url, PLAN_NAME)} are missing from the dataset (deleted or moved "
                        f"after planning); restore them to resume, or use --overwrite to plan anew")
    before = {p["name"] for p in plan.partitions}
    added = [n for n in now if n not in before]
    changed = [p["name"] for p in plan.partitions if p != now[p["name"]]]
    if not added and not changed:
        return  # the partitions are the same: the config differs, reported by the caller
    raise ConfigError(f"{plan.data_url}: the dataset changed since {plan.result_url} was planned "
                      f"(new: {added or 'none'}, changed: {changed or 'none'}); use --overwrite to plan anew or "
                      f"another result path")


def _write_tasks(plan: Plan) -> None:
    url = storage.join(plan.result_url, TASKS_NAME)
    tasks = plan.task_list()
    if not storage.exists(url) or storage.read_json(url) != tasks:
        storage.write_json(url, tasks)


def _existing_plan(result_url: str) -> Plan | None:
    url = storage.join(result_url, PLAN_NAME)
    if not storage.exists(url):
        return None
    return Plan.from_dict(storage.read_json(url), result_url, url)


def _has_outputs(result_url: str) -> bool:
    return any(storage.list_files(storage.join(result_url, d)) for d in RESULT_DIRS)


def clear_results(result_url: str) -> None:
    """Remove everything a previous run wrote under ``result_url`` (and nothing else)."""
    for d in RESULT_DIRS:
        for url in storage.list_files(storage.join(result_url, d)):
            storage.remove(url)
    for name in RESULT_FILES:
        storage.remove(storage.join(result_url, name))


def load_plan(result_url: str) -> Plan:
    """Read the plan written by :func:`make_plan`; DataError when there is none."""
    url = storage.join(result_url, PLAN_NAME)
    if not storage.exists(url):
        raise DataError(f"{url}: no plan found (run `cai run` or make_plan first)")
    return Plan.from_dict(storage.read_json(url), result_url, url)
