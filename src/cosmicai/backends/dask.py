"""The Dask backend: run one task per rank on any Dask cluster.

Three ways to get workers:

* no scheduler: an in-process ``LocalCluster`` of worker *processes*, one task per process at a time
  (``threads_per_worker=1``) and ``threads`` torch threads per process;
* ``scheduler="tcp://host:8786"`` (or a scheduler JSON file): an existing cluster;
* ``cluster=``: any cluster object, e.g. a dask-jobqueue ``SLURMCluster`` (see :mod:`.jobqueue`).

Each task is submitted with ``retries`` (covers exceptions raised by the task); tasks of a worker that dies
are rescheduled by Dask on another worker. The model is cached per worker process by the pipeline.

No process outlives the run: the worker processes of a LocalCluster started here are children of this process
(its nannies run inside it), and distributed's own ``AsyncProcess`` makes each one exit the moment this process
dies, SIGKILL included (a thread in the worker reads a pipe that only the parent holds open and calls
``os._exit`` at EOF). tests/test_process_lifetime.py checks it with a real SIGKILL, so no extra guard is added.
On SIGTERM, the CLI raises an interrupt (:mod:`.lifetime`): pending tasks are cancelled and :meth:`DaskBackend.close`
closes the cluster.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import uuid
from typing import Any, Callable, Iterator

from distributed import Client, LocalCluster, as_completed
from distributed.diagnostics.plugin import WorkerPlugin

from ..errors import ConfigError
from ..storage import S3_CLIENT_VARS
from .env import THREAD_VARS, gpu_ids
from ..processes import main_hidden


def worker_index(name: Any) -> int | None:
    """The index of a worker within its job/cluster from its name (``3``, ``"SLURMCluster-0-3"``), if any."""
    text = str(name)
    tail = text.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else None


def pick_gpu(name: Any, gpus_per_node: int, visible: str | None) -> str | None:
    """The ``CUDA_VISIBLE_DEVICES`` value a worker named ``name`` should use, one GPU per worker process."""
    if gpus_per_node < 1:
        return None
    index = worker_index(name)
    if index is None:
        return None
    devices = gpu_ids(visible, gpus_per_node)
    return devices[index % min(len(devices), gpus_per_node)]


class WorkerSetup(WorkerPlugin):
    """Worker plugin: sets torch threads and pins one GPU per worker process before any task runs."""

    def __init__(self, threads: int | None = None, gpus_per_node: int = 0, env: dict[str, str] | None = None):
        self.threads = threads
        self.gpus_per_node = gpus_per_node
        self.env = dict(env or {})
        # distinct names, so a GPU-pinning plugin is not replaced by a later threads-only one
        self.name = f"cosmicai-worker-setup-t{threads or 0}-g{gpus_per_node}-e{abs(hash(tuple(sorted(self.env.items()))))}"

    def setup(self, worker: Any) -> None:
        os.environ.update(self.env)
        if self.gpus_per_node > 1:
            device = pick_gpu(worker.name, self.gpus_per_node, os.environ.get("CUDA_VISIBLE_DEVICES"))
            if device is not None:
                os.environ["CUDA_VISIBLE_DEVICES"] = device
        if self.threads:
            for var in THREAD_VARS:
                os.environ[var] = str(self.threads)
            from ..models.worker import worker_models

            worker_models().configure(self.threads)


def run_token(tasks: list[dict]) -> str:
    """A short token for the task keys of one ``map`` call: the plan's hash, else a fresh unique token."""
    urls = {t.get("result_url") for t in tasks}
    if len(urls) == 1 and None not in urls:
        try:
            from ..pipeline.plan import load_plan

            return str(load_plan(urls.pop()).plan_hash)[:12]
        except Exception:  # noqa: BLE001 - no readable plan: fall back to a unique token
            pass
    basis = "|".join(sorted({str(t.get("result_url", "")) for t in tasks}))
    return hashlib.sha1(basis.encode()).hexdigest()[:8] + "-" + uuid.uuid4().hex[:6]


def _call(task: dict, fn: Callable[..., Any]) -> Any:
    return fn(**task)


class DaskBackend:
    """Run tasks on a Dask cluster; see the module docstring for how the cluster is chosen."""

    name = "dask"

    def __init__(self, scheduler: str | None = None, workers: int | None = None, threads: int | None = None,
                 device: str = "cpu", retries: int = 2, cluster: Any = None, gpus: int | None = None,
                 dashboard: str = ":0", quiet: bool = False, timeout: str = "30s", **kwargs: Any):
        for field, value in (("workers", workers), ("threads", threads), ("gpus", gpus)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ConfigError(f"dask backend: {field} must be a positive integer, got {value!r}")
        if not isinstance(retries, int) or retries < 0:
            raise ConfigError(f"dask backend: retries must be a non-negative integer, got {retries!r}")
        self.device = device or "cpu"
        self.retries = retries
        self._own_cluster = None
        cuda = self.device.startswith("cuda")
        if cluster is None and not scheduler:
            cpu = os.cpu_count() or 1
            if cuda and gpus is None:
                import torch

                gpus = max(1, torch.cuda.device_count())
            if workers is None:
                workers = gpus if cuda else max(1, cpu // (threads or 1))
            if threads is None:
                threads = max(1, cpu // workers)
            env = {var: str(threads) for var in THREAD_VARS}
            with main_hidden():  # workers start without re-running the caller's script (see cosmicai.processes)
                cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, env=env,
                                       dashboard_address=dashboard, resources={"GPU": 1} if cuda else None,
                                       silence_logs=logging.CRITICAL, **kwargs)
            self._own_cluster = cluster
            gpus_per_node = gpus or 0
        else:
            if kwargs:
                raise ConfigError(f"dask backend: options {sorted(kwargs)} only apply to a LocalCluster")
            gpus_per_node = 0
        self.gpus = gpus if cuda or gpus else None
        try:
            if cluster is not None:
                self.client = Client(cluster)
            elif scheduler.endswith(".json") and os.path.exists(scheduler):
                self.client = Client(scheduler_file=scheduler)
            else:
                self.client = Client(scheduler, timeout=timeout)
        except OSError as exc:
            self.close()
            raise ConfigError(f"dask backend: cannot reach the scheduler {scheduler!r}: {exc}") from exc
        # The S3 endpoint and timeouts the client uses (storage.S3_CLIENT_VARS) must reach remote workers too (they
        # get only their task items).
        env = {var: os.environ[var] for var in S3_CLIENT_VARS if os.environ.get(var)}
        if threads or gpus_per_node > 1 or env:
            self.client.register_plugin(WorkerSetup(threads, gpus_per_node, env))
        self.dashboard_link = self.client.dashboard_link
        if not quiet:
            print(f"cai: dask dashboard at {self.dashboard_link}", file=sys.stderr)

    def map(self, fn: Callable[..., Any], tasks: list[dict]) -> Iterator[tuple[dict, Any]]:
        """Submit one Dask task per item; yield ``(task, result or exception)`` as each completes."""
        tasks = list(tasks)
        token = run_token(tasks)
        resources = {"GPU": 1} if self.gpus else None
        keys: list[str] = []
        seen: set[str] = set()
        for i, task in enumerate(tasks):
            key = f"cai-rank-{task.get('rank', i)}-{token}"
            if key in seen:  # a repeated item still gets its own task
                key = f"{key}-{i}"
            seen.add(key)
            keys.append(key)
        # one batched submission (a single graph update) instead of one message per task
        submitted = self.client.map(_call, tasks, fn=fn, key=keys, retries=self.retries, pure=False,
                                    resources=resources) if tasks else []
        futures = dict(zip(submitted, tasks))
        try:
            # results are gathered on the client's event loop as tasks finish; errors come back as values
            for future, result in as_completed(list(futures), with_results=True, raise_errors=False):
                task = futures[future]
                if future.status == "error":  # the task's own exception, or KilledWorker
                    result = result[1]
                future.release()
                yield task, result
        finally:
            pending = [f for f in futures if not f.done()]
            if pending:
                self.client.cancel(pending)

    def close(self) -> None:
        """Close the client, and the LocalCluster when this backend started it."""
        client = getattr(self, "client", None)
        if client is not None:
            client.close()
        if self._own_cluster is not None:
            self._own_cluster.close()
            self._own_cluster = None

    def __enter__(self) -> "DaskBackend":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
