"""A throwaway single-node Slurm for tests: munged, slurmctld and slurmd on this host, in a temp folder.

Usage (pytest)::

    from slurm_cluster import SlurmCluster, missing_reason

    @pytest.fixture
    def slurm(monkeypatch):
        reason = missing_reason()
        if reason:
            pytest.skip(reason)
        with SlurmCluster() as cluster:
            monkeypatch.setenv("SLURM_CONF", cluster.conf)   # sbatch/squeue/scancel of the test use it
            yield cluster

What it does:

* writes a minimal ``slurm.conf`` for this host into a fresh temp folder: ``NodeName`` = ``hostname -s`` at
  127.0.0.1, ``CPUs`` = the usable cores, a modest ``RealMemory``, one partition ``cai`` (the default),
  ``select/cons_tres`` with ``CR_CPU``, ``proctrack/linuxproc`` and ``task/none`` (no cgroups, so no
  ``cgroup.conf``), ``SlurmUser=root``, controller and node daemon on free TCP ports, state, spool, logs and pid
  files in the temp folder, no accounting database; finished jobs are appended to ``jobcomp.log``
  (``jobcomp/filetxt``), which :meth:`SlurmCluster.finished_jobs` parses;
* starts ``munged`` with its own key (``mungekey``, else 1 KiB from ``os.urandom``) and socket, then
  ``slurmctld -D`` and ``slurmd -D`` as child processes of this one, and waits until ``sinfo`` shows the node
  ``idle``;
* on exit (or :meth:`stop`): cancels every job, waits for them to leave ``squeue``, stops the daemons
  (SIGTERM, then SIGKILL) and kills whatever they left: any process whose environment points at this
  cluster's ``slurm.conf`` (the jobs' processes inherit ``SLURM_CONF`` from sbatch, the daemons and
  slurmstepd carry ``CAI_SLURM_TEST``), so nothing it started is left running; then removes the folder.

It needs root (``SlurmUser=root``; slurmd runs jobs as their user) and the Debian packages ``slurm-wlm`` and
``munge``; :func:`missing_reason` says which is missing, for a skip.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

SBIN = ("/usr/sbin", "/usr/local/sbin", "/sbin")
DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sinfo", "squeue", "sbatch", "scancel", "scontrol")
PARTITION = "cai"
MARKER = "CAI_SLURM_TEST"


def which(name: str) -> str | None:
    """``name`` on PATH, else in the sbin folders (not on a non-root PATH)."""
    found = shutil.which(name)
    if found:
        return found
    for folder in SBIN:
        path = os.path.join(folder, name)
        if os.access(path, os.X_OK):
            return path
    return None


def missing_reason() -> str | None:
    """Why a Slurm cannot be started here (for ``pytest.skip``), or None when it can."""
    missing = [name for name in DAEMONS + CLIENTS if which(name) is None]
    if missing:
        return (f"Slurm/munge binaries not installed ({', '.join(missing)} not found); "
                f"`apt-get install -y slurm-wlm munge` (Debian) to run this test")
    if os.geteuid() != 0:
        return "starting a test Slurm needs root (slurmd runs jobs as their user; SlurmUser=root)"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return "(no file)"


def _die_with_parent() -> None:
    """In the child before exec (Linux): SIGTERM it when the process that started it dies."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class SlurmError(RuntimeError):
    pass


class SlurmCluster:
    """A single-node Slurm in a temp folder; a context manager (start on enter, stop on exit)."""

    def __init__(self, cpus: int | None = None, memory_mb: int | None = None, root: str | None = None,
                 start_timeout: float = 60.0):
        self.host = socket.gethostname().split(".")[0]
        self.cpus = cpus or len(os.sched_getaffinity(0))
        if memory_mb is None:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
            memory_mb = max(1024, min(8192, total // 2))
        self.memory_mb = memory_mb
        self.start_timeout = start_timeout
        # short: the munge socket path must fit in sun_path (108 bytes)
        self._own_root = root is None
        self.root = Path(root or tempfile.mkdtemp(prefix="cai-slurm-"))
        self.conf = str(self.root / "slurm.conf")
        self.jobcomp = self.root / "jobcomp.log"
        self.socket = str(self.root / "munge" / "munge.socket")
        self.procs: dict[str, subprocess.Popen] = {}
        self._logs: dict[str, Any] = {}

    # -- environment -----------------------------------------------------------------------------------------
    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """``base`` (default os.environ) with SLURM_CONF pointing at this cluster and the sbin folders on PATH."""
        env = dict(os.environ if base is None else base)
        env["SLURM_CONF"] = self.conf
        path = env.get("PATH", "")
        env["PATH"] = os.pathsep.join([path] + [d for d in SBIN if d not in path.split(os.pathsep)])
        return env

    def cmd(self, *args: str, timeout: float = 20, check: bool = True) -> subprocess.CompletedProcess:
        """Run a Slurm client command (``sinfo``, ``squeue`` ...) against this cluster."""
        exe = which(args[0]) or args[0]
        return subprocess.run([exe, *args[1:]], env=self.env(), capture_output=True, text=True,
                              timeout=timeout, check=check)

    # -- config ------------------------------------------------------------------------------------------------
    def write_config(self) -> None:
        for sub in ("state", "spool", "munge", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(self.root / "munge", 0o700)
        r = self.root
        lines = [
            "# written by tests/slurm_cluster.py: a single-node test cluster",
            "ClusterName=caitest",
            f"SlurmctldHost={self.host}(127.0.0.1)",
            "SlurmUser=root",
            "SlurmdUser=root",
            f"SlurmctldPort={free_port()}",
            f"SlurmdPort={free_port()}",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.socket}",
            f"StateSaveLocation={r / 'state'}",
            f"SlurmdSpoolDir={r / 'spool'}",
            f"SlurmctldPidFile={r / 'slurmctld.pid'}",
            f"SlurmdPidFile={r / 'slurmd.pid'}",
            f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={r / 'log' / 'slurmd.log'}",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/filetxt",
            f"JobCompLoc={self.jobcomp}",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "SchedulerType=sched/backfill",
            "MpiDefault=none",
            "SwitchType=switch/none",
            "ReturnToService=2",
            "KillWait=5",
            "MinJobAge=60",
            "InactiveLimit=0",
            "SlurmdTimeout=60",
            f"NodeName={self.host} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={self.memory_mb} State=UNKNOWN",
            f"PartitionName={PARTITION} Nodes={self.host} Default=YES MaxTime=INFINITE State=UP",
        ]
        Path(self.conf).write_text("\n".join(lines) + "\n")

    # -- daemons -----------------------------------------------------------------------------------------------
    def _spawn(self, name: str, args: list[str]) -> None:
        out = open(self.root / "log" / f"{name}.out", "w")
        self._logs[name] = out
        env = self.env()
        env[MARKER] = str(self.root)
        # own session: a Ctrl-C to the test reaches the teardown (which cancels the jobs first), not the daemons;
        # the parent-death signal stops them should this process be killed without a teardown
        self.procs[name] = subprocess.Popen([which(args[0]) or args[0], *args[1:]], stdout=out,
                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                            start_new_session=True, preexec_fn=_die_with_parent)

    def _check_alive(self, name: str) -> None:
        proc = self.procs[name]
        if proc.poll() is not None:
            log = self.root / "log" / (f"{name}.log" if name.startswith("slurm") else "munged.log")
            raise SlurmError(f"{name} exited with status {proc.returncode} during start-up\n"
                             f"--- {name} output ---\n{_tail(self.root / 'log' / f'{name}.out')}\n"
                             f"--- {log.name} ---\n{_tail(log)}")

    def _munge_key(self) -> str:
        key = self.root / "munge" / "munge.key"
        if not key.exists():
            mungekey = which("mungekey")
            if mungekey:
                subprocess.run([mungekey, "--create", "--keyfile", str(key)], check=True, capture_output=True,
                               timeout=30)
            else:
                key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o600)
        return str(key)

    def start(self) -> "SlurmCluster":
        self.write_config()
        m = self.root / "munge"
        self._spawn("munged", ["munged", "--foreground", "--force", f"--socket={self.socket}",
                               f"--key-file={self._munge_key()}", f"--log-file={self.root / 'log' / 'munged.log'}",
                               f"--pid-file={m / 'munged.pid'}", f"--seed-file={m / 'munged.seed'}"])
        self._wait(lambda: os.path.exists(self.socket), "munged", "the munge socket")
        self._spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", self.conf])
        self._wait(lambda: self.cmd("sinfo", "-h", check=False, timeout=10).returncode == 0, "slurmctld",
                   "slurmctld to answer sinfo")
        self._spawn("slurmd", ["slurmd", "-D", "-f", self.conf, "-N", self.host])
        self._wait(lambda: self.node_state() == "idle", "slurmd", f"node {self.host} idle in sinfo")
        return self

    def _wait(self, ready: Any, name: str, what: str) -> None:
        deadline = time.monotonic() + self.start_timeout
        while True:
            for daemon in self.procs:
                self._check_alive(daemon)
            try:
                if ready():
                    return
            except (subprocess.SubprocessError, OSError):
                pass
            if time.monotonic() > deadline:
                state = self.cmd("sinfo", "-N", "-h", "-o", "%N %T %E", check=False).stdout.strip()
                raise SlurmError(f"timed out after {self.start_timeout:.0f} s waiting for {what} (sinfo: "
                                 f"{state!r})\n--- {name} log ---\n"
                                 f"{_tail(self.root / 'log' / (name + '.log'))}")
            time.sleep(0.2)

    def node_state(self) -> str:
        out = self.cmd("sinfo", "-N", "-h", "-n", self.host, "-o", "%T", check=False, timeout=10).stdout
        return out.strip().rstrip("*~#!%$@^-").lower()

    # -- jobs --------------------------------------------------------------------------------------------------
    def queue(self, name: str | None = None) -> list[dict[str, str]]:
        """Jobs in ``squeue`` (pending, running, completing), optionally only those called ``name``."""
        args = ["squeue", "-h", "-o", "%i|%j|%T|%N"] + (["-n", name] if name else [])
        rows = []
        for line in self.cmd(*args).stdout.splitlines():
            if line.strip():
                job_id, job_name, state, nodes = line.split("|", 3)
                rows.append({"id": job_id, "name": job_name, "state": state, "nodes": nodes})
        return rows

    def finished_jobs(self) -> list[dict[str, str]]:
        """Jobs that ended, from the jobcomp/filetxt log: ``JobId``, ``Name``, ``JobState``, ``NodeList`` ..."""
        jobs = []
        text = self.jobcomp.read_text(errors="replace") if self.jobcomp.exists() else ""
        for line in text.splitlines():
            fields = {}
            for item in line.split():
                key, sep, value = item.partition("=")
                if sep:
                    fields[key] = value
            if "JobId" in fields:
                jobs.append(fields)
        return jobs

    def wait_queue_empty(self, name: str | None = None, timeout: float = 30.0) -> list[dict[str, str]]:
        """Wait until no job (called ``name``) is in ``squeue``; returns what is left (empty on success)."""
        deadline = time.monotonic() + timeout
        while True:
            left = self.queue(name)
            if not left or time.monotonic() > deadline:
                return left
            time.sleep(0.3)

    # -- processes ---------------------------------------------------------------------------------------------
    def processes(self, include_daemons: bool = False) -> list[Any]:
        """Live processes this cluster started: job processes (``SLURM_CONF`` = this conf), slurmstepd ...

        The daemons themselves are left out unless ``include_daemons``.
        """
        import psutil

        daemons = {p.pid for p in self.procs.values()}
        found = []
        for proc in psutil.process_iter(["pid"]):
            if proc.pid == os.getpid() or (proc.pid in daemons and not include_daemons):
                continue
            try:
                env = proc.environ()
                if proc.status() == psutil.STATUS_ZOMBIE:
                    continue
            except (psutil.Error, OSError):
                continue
            if env.get("SLURM_CONF") == self.conf or env.get(MARKER) == str(self.root):
                found.append(proc)
        return found

    def stop(self) -> None:
        """Cancel all jobs, stop the daemons, kill anything left, remove the temp folder."""
        import psutil

        if self.procs.get("slurmctld") is not None and self.procs["slurmctld"].poll() is None:
            try:
                self.cmd("scancel", "--full", "-p", PARTITION, check=False, timeout=10)
                self.wait_queue_empty(timeout=20)
            except (subprocess.SubprocessError, OSError):
                pass
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        for proc in self.processes(include_daemons=True):
            try:
                proc.kill()
            except psutil.Error:
                pass
        for out in self._logs.values():
            out.close()
        self._logs.clear()
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def logs(self) -> str:
        """The daemons' log tails, for failure messages."""
        return "\n".join(f"--- {name} ---\n{_tail(self.root / 'log' / name)}"
                         for name in ("slurmctld.log", "slurmd.log", "munged.log"))

    def __enter__(self) -> "SlurmCluster":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: Any) -> None:
        self.stop()


if __name__ == "__main__":  # python tests/slurm_cluster.py: start, show sinfo, run a job, stop
    reason = missing_reason()
    if reason:
        raise SystemExit(reason)
    t0 = time.perf_counter()
    with SlurmCluster() as c:
        print(f"up in {time.perf_counter() - t0:.1f} s; SLURM_CONF={c.conf}")
        print(c.cmd("sinfo").stdout)
        print(c.cmd("sbatch", "--wrap", "sleep 1; hostname", "-o", str(c.root / "job-%j.out")).stdout)
        time.sleep(3)
        print(c.queue(), c.finished_jobs())
    print(f"stopped after {time.perf_counter() - t0:.1f} s")
