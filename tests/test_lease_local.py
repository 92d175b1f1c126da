"""The lease on local disk, as deployments meet it: another PID namespace with the same host name, a clock an hour
ahead, a malformed lease file, a full disk, a read-only folder, and a lease taken away while a run holds it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from cosmicai.errors import StorageError
from cosmicai.pipeline import lease as lease_mod
from cosmicai.pipeline.lease import Lease, LeaseHeldError
from cosmicai.results import LEASE_NAME

ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mount, unshare)")


def _foreign(**kw) -> dict:
    info = {"run_id": "f" * 32, "user": "someone", "host": "elsewhere.example", "pid": 4242,
            "started_at": "2026-11-30T00:00:00Z", "heartbeat": time.time()}
    return {**info, **kw}


def _write(folder: Path, content: bytes | dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LEASE_NAME
    path.write_bytes(content if isinstance(content, bytes) else json.dumps(content).encode())
    return path


def _holder(path: Path) -> dict:
    return json.loads(path.read_bytes())


# ----------------------------------------------------------------------------- another PID namespace

def _pid_free_here(start: int = 29000) -> int:
    for pid in range(start, start - 5000, -1):
        if not lease_mod._pid_alive(pid):
            return pid
    pytest.skip("no free pid found below 29000")


@ROOT_ONLY
def test_a_live_lease_from_another_pid_namespace_is_not_taken_over(tmp_path, monkeypatch):
    if shutil.which("unshare") is None:
        pytest.skip("unshare (util-linux) is not installed")
    if subprocess.run(["unshare", "-pf", "--mount-proc", "true"], capture_output=True).returncode != 0:
        pytest.skip("unshare -pf --mount-proc is not permitted here")
    shared = tmp_path / "res"
    pid = _pid_free_here()
    child = tmp_path / "hold.py"
    child.write_text("import sys\nfrom cosmicai.pipeline import lease\nlease.HEARTBEAT_S = 0.2\n"
                     "held = lease.Lease(sys.argv[1]).acquire()\nprint('held', flush=True)\nsys.stdin.read()\n"
                     "held.release()\n")
    # in the new namespace the python gets pid ``pid``, a pid that no process of this namespace has
    script = f'echo {pid - 1} > /proc/sys/kernel/ns_last_pid && "$0" "$1" "$2"; exit $?'
    proc = subprocess.Popen(["unshare", "-pf", "--mount-proc", "sh", "-c", script, sys.executable, str(child),
                             str(shared)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        assert proc.stdout.readline() == b"held\n", proc.stderr.read1().decode()
        held = _holder(shared / LEASE_NAME)
        assert held["pid"] == pid and held["host"] == socket.gethostname() and held["boot_id"] == lease_mod._boot_id()
        assert held["pid_ns"] != lease_mod._pid_ns() and not lease_mod._pid_alive(pid)  # "gone", seen from here
        first_beat = held["heartbeat"]
        for _ in range(2):
            with pytest.raises(LeaseHeldError, match=rf"res is in use by a live run \(pid {pid} on host "
                                                     rf"{socket.gethostname()} .*heartbeat [01] s ago\)"):
                Lease(str(shared)).acquire()
            time.sleep(0.5)
        assert _holder(shared / LEASE_NAME)["heartbeat"] > first_beat    # it kept beating: still its lease
        os.killpg(proc.pid, signal.SIGKILL)   # the whole namespace dies without releasing
        proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate(timeout=30)
    # its pid cannot be proven gone from here: the lease stays live until its heartbeat is STALE_S old ...
    with pytest.raises(LeaseHeldError, match="is in use by a live run"):
        Lease(str(shared)).acquire()
    later = time.time() + lease_mod.STALE_S + 5
    monkeypatch.setattr(lease_mod, "_now", lambda: later)
    with pytest.raises(LeaseHeldError, match=r"holds a stale lease .*rerun with --break-lease"):
        Lease(str(shared)).acquire()
    taken = Lease(str(shared), break_stale=True).acquire()
    assert taken.took_over["pid"] == pid and _holder(shared / LEASE_NAME)["run_id"] == taken.info["run_id"]
    taken.release()
    assert not (shared / LEASE_NAME).exists()


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


@pytest.mark.parametrize("differs, taken", [(None, True), ("pid_ns", False), ("boot_id", False), ("host", False)])
def test_a_dead_pid_is_trusted_only_from_this_host_boot_and_pid_namespace(tmp_path, differs, taken):
    here = {"host": socket.gethostname(), "boot_id": lease_mod._boot_id(), "pid_ns": lease_mod._pid_ns()}
    if None in here.values():
        pytest.skip("no /proc boot id or pid namespace here")
    if differs is not None:
        here[differs] = {"pid_ns": 1, "boot_id": "0" * 8, "host": "other"}[differs]
    pid = _dead_pid()
    path = _write(tmp_path / "res", _foreign(pid=pid, **here))
    if taken:   # a crashed run of this very namespace: taken over at once, without --break-lease
        with Lease(str(tmp_path / "res")) as held:
            assert held.took_over["pid"] == pid and _holder(path)["run_id"] == held.info["run_id"]
    else:
        with pytest.raises(LeaseHeldError, match=rf"in use by a live run \(pid {pid} "):
            Lease(str(tmp_path / "res")).acquire()
        assert _holder(path)["pid"] == pid


def test_a_reused_pid_is_seen_through_its_start_time(tmp_path):
    me = {"host": socket.gethostname(), "boot_id": lease_mod._boot_id(), "pid_ns": lease_mod._pid_ns()}
    start = lease_mod._pid_start()
    if None in me.values() or start is None:
        pytest.skip("no /proc here")
    _write(tmp_path / "res", _foreign(pid=os.getpid(), pid_start=start - 1, **me))  # same pid, another process
    with Lease(str(tmp_path / "res")) as held:
        assert held.took_over["pid_start"] == start - 1


# ----------------------------------------------------------------------------- clocks and malformed leases

def test_a_heartbeat_from_the_future_expires_after_silence_and_can_be_broken(tmp_path, monkeypatch):
    written = time.time()
    path = _write(tmp_path / "res", _foreign(heartbeat=written + 3600))   # its writer's clock is an hour ahead
    with pytest.raises(LeaseHeldError,
                       match=r"in use by a live run \(.*heartbeat [01] s ago, its clock 3[56]\d\d s ahead"):
        Lease(str(tmp_path / "res")).acquire()
    clock = {"now": written + lease_mod.STALE_S - 5}
    monkeypatch.setattr(lease_mod, "_now", lambda: clock["now"])
    with pytest.raises(LeaseHeldError, match=r"in use by a live run \(.*heartbeat 11[45] s ago"):
        Lease(str(tmp_path / "res")).acquire()
    clock["now"] = written + lease_mod.STALE_S + 5   # silent for longer than STALE_S since its last write
    with pytest.raises(LeaseHeldError,
                       match=r"holds a stale lease \(.*heartbeat 12[45] s ago, its clock .*--break-lease"):
        Lease(str(tmp_path / "res")).acquire()
    assert _holder(path)["host"] == "elsewhere.example"
    with Lease(str(tmp_path / "res"), break_stale=True) as held:
        assert held.took_over["host"] == "elsewhere.example"
        assert _holder(path)["run_id"] == held.info["run_id"]
    assert not path.exists()


MALFORMED = [
    (json.dumps(_foreign(heartbeat="yesterday")).encode(), r"its heartbeat is 'yesterday', not a time"),
    (json.dumps(_foreign(heartbeat=None)).encode(), r"its heartbeat is None, not a time"),
    (json.dumps(_foreign(pid="4242")).encode(), r"its pid is '4242', not a process id"),
    (json.dumps(_foreign(pid=-1)).encode(), r"its pid is -1, not a process id"),
    (b'[1, 2, 3]', r"it holds a JSON list, not an object"),
    (b"", r"it is empty"),
    (b"\x00\xff\xfe\x01lease", r"its 9 bytes are not JSON"),
]


@pytest.mark.parametrize("content, problem", MALFORMED,
                         ids=["yesterday", "null", "pid-str", "pid-neg", "list", "empty", "binary"])
def test_a_malformed_lease_is_named_in_one_line_and_can_be_broken(tmp_path, content, problem):
    path = _write(tmp_path / "res", content)
    with pytest.raises(LeaseHeldError) as caught:
        Lease(str(tmp_path / "res")).acquire()
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{path} is not a valid lease (")
    assert problem in message and message.endswith("rerun with --break-lease to clear it")
    assert path.read_bytes() == content   # refused: untouched
    with Lease(str(tmp_path / "res"), break_stale=True) as held:
        assert held.took_over == {"problem": message.split(" (", 1)[1].split("); if no run")[0]}
        assert _holder(path)["run_id"] == held.info["run_id"]
    assert not path.exists()


# ----------------------------------------------------------------------------- concurrent starts, lost leases

def test_only_one_of_many_simultaneous_starts_takes_the_lease(tmp_path):
    results: list[object] = []
    gate = threading.Barrier(8)

    def start() -> None:
        gate.wait()
        try:
            results.append(Lease(str(tmp_path / "res")).acquire())
        except LeaseHeldError as exc:
            results.append(exc)

    threads = [threading.Thread(target=start) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    winners = [r for r in results if isinstance(r, Lease)]
    assert len(results) == 8 and len(winners) == 1
    assert _holder(tmp_path / "res" / LEASE_NAME)["run_id"] == winners[0].info["run_id"]
    winners[0].release()
    assert os.listdir(tmp_path / "res") == []


def test_a_run_whose_lease_is_taken_stops_beating_and_leaves_the_new_lease(tmp_path, monkeypatch, capfd):
    monkeypatch.setattr(lease_mod, "HEARTBEAT_S", 0.05)
    held = Lease(str(tmp_path / "res")).acquire()
    other = _foreign(run_id="b" * 32, host="breaker.example")
    path = _write(tmp_path / "res", other)   # another host broke it (--break-lease) while this run lived
    deadline = time.monotonic() + 10
    while held.lost is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert held.lost is not None and "breaker.example" in held.lost
    with pytest.raises(LeaseHeldError, match=r"res: this run lost its lease while running \(now held by pid 4242 on "
                                             r"host breaker.example"):
        held.release()
    assert _holder(path) == other   # neither overwritten by a heartbeat nor deleted by the release
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and "another run took this run's lease" in err


# ----------------------------------------------------------------------------- full disk, read-only folder

@pytest.fixture
def mount_point(tmp_path):
    """A list the test appends mount points to; each is unmounted at the end (last first)."""
    mounted: list[Path] = []
    yield mounted
    for point in reversed(mounted):
        subprocess.run(["umount", str(point)], check=False, capture_output=True)


@ROOT_ONLY
def test_a_full_disk_at_run_start_leaves_no_lease_and_says_so(tmp_path, mount_point, tiny_dataset):
    from cosmicai.config import load_config
    from cosmicai.runners.pipeline import run

    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    mount_point.append(disk)
    result = disk / "res"
    result.mkdir()
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        with pytest.raises(OSError, match="No space left"):
            while True:
                os.write(fd, b"\0" * 4096)
    finally:
        os.close(fd)
    with pytest.raises(StorageError) as caught:
        Lease(str(result)).acquire()
    assert str(caught.value) == (f"no space left on {result}: the run's lease cannot be written; free some space "
                                 "and rerun")
    assert os.listdir(result) == []        # no empty or partial lease.json, no temporary file
    config = load_config({"data": tiny_dataset, "result": str(result), "model": "astromae-random", "workers": 1,
                          "threads": 1, "batch_size": 12})[0]
    with pytest.raises(StorageError, match=rf"^no space left on {result}: "):
        run(config, progress=False)
    assert os.listdir(result) == []
    filler.unlink()   # space freed: the next run works
    with Lease(str(result)) as held:
        assert _holder(result / LEASE_NAME)["run_id"] == held.info["run_id"]
    assert os.listdir(result) == []


@ROOT_ONLY
def test_a_read_only_result_folder_is_named_in_one_line(tmp_path, mount_point):
    source, view = tmp_path / "src", tmp_path / "view"
    (source / "res").mkdir(parents=True)
    view.mkdir()
    if subprocess.run(["mount", "--bind", str(source), str(view)]).returncode != 0:
        pytest.skip("cannot bind-mount here")
    mount_point.append(view)
    assert subprocess.run(["mount", "-o", "remount,bind,ro", str(view)]).returncode == 0
    for folder in (view / "res", view / "new" / "res"):   # an existing folder, and one the run would create
        with pytest.raises(StorageError) as caught:
            Lease(str(folder)).acquire()
        assert str(caught.value) == f"{folder} is read-only: the run's lease cannot be written; give a writable " \
            "--result"
    assert os.listdir(source) == ["res"] and os.listdir(source / "res") == []
