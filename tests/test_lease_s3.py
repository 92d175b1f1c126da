"""The lease on S3: it excludes on a server that enforces conditional writes (moto's server), and on one that
ignores them (rclone serve s3) the run is refused in one line unless the risk is accepted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest

from cosmicai.pipeline import lease as lease_mod
from cosmicai.pipeline.lease import Lease, LeaseHeldError, UnsafeLeaseError
from cosmicai.results import LEASE_NAME

SECOND_RUN = ("import sys\nfrom cosmicai.pipeline.lease import Lease, LeaseHeldError\n"
              "try:\n    Lease(sys.argv[1]).acquire()\nexcept LeaseHeldError as exc:\n"
              "    print(exc)\n    sys.exit(3)\nprint('acquired')\n")


def _keys(server, prefix: str) -> list[str]:
    listed = server.client().list_objects_v2(Bucket=server.bucket, Prefix=prefix + "/")
    return sorted(obj["Key"][len(prefix) + 1:] for obj in listed.get("Contents", []))


def _lease_body(server, prefix: str) -> dict:
    return json.loads(server.client().get_object(Bucket=server.bucket, Key=f"{prefix}/{LEASE_NAME}")["Body"].read())


def _put_lease(server, prefix: str, **fields) -> dict:
    info = {"run_id": "f" * 32, "user": "someone", "host": "elsewhere.example", "pid": 4242,
            "started_at": "2026-11-30T00:00:00Z", "heartbeat": time.time(), **fields}
    server.client().put_object(Bucket=server.bucket, Key=f"{prefix}/{LEASE_NAME}", Body=json.dumps(info).encode())
    return info


@pytest.fixture
def moto_prefix(moto_s3, monkeypatch, request):
    monkeypatch.delenv(lease_mod.UNSAFE_ENV, raising=False)   # exclusion must not depend on accepting any risk
    return f"lease-{request.node.name[:40]}-{time.time_ns()}"


# ----------------------------------------------------------------------------- moto: conditional writes enforced

def test_a_second_run_is_refused_also_from_another_process(moto_s3, moto_prefix):
    url = moto_s3.url(moto_prefix)
    with Lease(url) as first:
        probe = lease_mod._PROBES[(moto_s3.endpoint, moto_s3.bucket)]
        assert probe.ignored is None and probe.delete_if_match
        assert _keys(moto_s3, moto_prefix) == [LEASE_NAME]   # the probe object is gone
        with pytest.raises(LeaseHeldError, match=rf"is in use by a live run \(pid {os.getpid()} on host "):
            Lease(url).acquire()
        t0 = time.perf_counter()
        other = subprocess.run([sys.executable, "-c", SECOND_RUN, url], capture_output=True, text=True, timeout=60)
        refused_s = time.perf_counter() - t0
        assert other.returncode == 3, other.stderr
        assert other.stdout.startswith(f"{url} is in use by a live run (pid {os.getpid()} on host ")
        assert _lease_body(moto_s3, moto_prefix)["run_id"] == first.info["run_id"]
    assert _keys(moto_s3, moto_prefix) == []
    print(f"second process refused in {refused_s:.2f} s (interpreter start included)")


def test_only_one_of_many_simultaneous_starts_takes_the_lease(moto_s3, moto_prefix):
    url = moto_s3.url(moto_prefix)
    results: list[object] = []
    gate = threading.Barrier(6)

    def start() -> None:
        gate.wait()
        try:
            results.append(Lease(url).acquire())
        except LeaseHeldError as exc:
            results.append(exc)

    threads = [threading.Thread(target=start) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    winners = [r for r in results if isinstance(r, Lease)]
    assert len(results) == 6 and len(winners) == 1, results
    assert _lease_body(moto_s3, moto_prefix)["run_id"] == winners[0].info["run_id"]
    winners[0].release()
    assert _keys(moto_s3, moto_prefix) == []


def test_a_heartbeat_or_release_with_a_stale_etag_leaves_the_other_runs_lease(moto_s3, moto_prefix, monkeypatch,
                                                                              capfd):
    monkeypatch.setattr(lease_mod, "HEARTBEAT_S", 0.1)
    url = moto_s3.url(moto_prefix)
    held = Lease(url).acquire()
    with held._io:   # no heartbeat in between: the run holds the ETag the server has
        assert held._token == moto_s3.client().head_object(Bucket=moto_s3.bucket,
                                                           Key=f"{moto_prefix}/{LEASE_NAME}")["ETag"]
    other = _put_lease(moto_s3, moto_prefix, run_id="b" * 32, host="breaker.example")   # broken from elsewhere
    deadline = time.monotonic() + 20
    while held.lost is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert held.lost is not None and "breaker.example" in held.lost
    with pytest.raises(LeaseHeldError, match=r"this run lost its lease while running \(now held by pid 4242 on host "
                                             r"breaker.example"):
        held.release()
    assert _lease_body(moto_s3, moto_prefix) == other   # not overwritten by a heartbeat, not deleted
    assert "another run took this run's lease" in capfd.readouterr().err
    # a release holding an ETag that is no longer the lease's is refused by the server itself
    store = lease_mod._S3Store(moto_s3.url(f"{moto_prefix}/{LEASE_NAME}"))
    store.check_conditions()
    assert store.delete('"0123456789abcdef0123456789abcdef"') is False
    assert store.replace(b"{}", '"0123456789abcdef0123456789abcdef"') is None
    assert _lease_body(moto_s3, moto_prefix) == other


def test_a_stale_lease_is_broken_only_when_asked(moto_s3, moto_prefix):
    url = moto_s3.url(moto_prefix)
    _put_lease(moto_s3, moto_prefix, heartbeat=time.time() - 3600)
    with pytest.raises(LeaseHeldError, match=r"holds a stale lease \(pid 4242 on host elsewhere.example .*heartbeat "
                                             r"36\d\d s ago\); if that run is dead, rerun with --break-lease"):
        Lease(url).acquire()
    with Lease(url, break_stale=True) as held:
        assert held.took_over["host"] == "elsewhere.example"
        assert _lease_body(moto_s3, moto_prefix)["run_id"] == held.info["run_id"]
    assert _keys(moto_s3, moto_prefix) == []


def test_a_malformed_lease_on_s3_is_named_and_can_be_broken(moto_s3, moto_prefix):
    url = moto_s3.url(moto_prefix)
    moto_s3.client().put_object(Bucket=moto_s3.bucket, Key=f"{moto_prefix}/{LEASE_NAME}", Body=b'{"heartbeat": null}')
    with pytest.raises(LeaseHeldError, match=rf"^{url}/lease.json is not a valid lease \(its run_id is None, not a "
                                             r"run id\); if no run is using .*--break-lease to clear it$"):
        Lease(url).acquire()
    with Lease(url, break_stale=True) as held:
        assert _lease_body(moto_s3, moto_prefix)["run_id"] == held.info["run_id"]
    assert _keys(moto_s3, moto_prefix) == []


# ----------------------------------------------------------------------------- rclone: conditional writes ignored

def test_a_server_that_ignores_conditional_writes_is_refused_unless_accepted(s3_server, s3_url, monkeypatch, capfd):
    assert s3_server.kind == "rclone", "this test needs the server that ignores conditional writes"
    monkeypatch.delenv(lease_mod.UNSAFE_ENV, raising=False)
    monkeypatch.setattr(lease_mod, "_PROBES", {})   # probe again, and time it
    prefix = s3_url.split("/", 3)[3]
    with pytest.raises(UnsafeLeaseError) as caught:
        Lease(s3_url).acquire()
    assert str(caught.value) == (
        f"the S3 endpoint {s3_server.endpoint} (bucket {s3_server.bucket}) ignores conditional writes (a put with "
        f"If-None-Match: * replaced an existing object), so a lease on {s3_url} cannot keep a second run out; use a "
        "server that enforces them, or accept the risk with --allow-unsafe-lease or CAI_ALLOW_UNSAFE_LEASE=1")
    assert _keys(s3_server, prefix) == []   # refused before anything but the probe (removed) was written
    probe_ms = lease_mod._PROBES[(s3_server.endpoint, s3_server.bucket)].ms
    for accept in ({"allow_unsafe": True}, {}):
        if not accept:
            monkeypatch.setenv(lease_mod.UNSAFE_ENV, "1")
        capfd.readouterr()
        with Lease(s3_url, **accept) as held:
            assert _lease_body(s3_server, prefix)["run_id"] == held.info["run_id"]
            with pytest.raises(LeaseHeldError, match="is in use by a live run"):   # still refused when seen
                Lease(s3_url, **accept).acquire()
        err = capfd.readouterr().err.splitlines()
        assert err and all(line == f"cai: warning: the S3 endpoint {s3_server.endpoint} (bucket {s3_server.bucket}) "
                           f"ignores conditional writes: the lease on {s3_url} cannot keep a second run out (accepted "
                           "with --allow-unsafe-lease or CAI_ALLOW_UNSAFE_LEASE=1)" for line in err)
        assert _keys(s3_server, prefix) == []
    print(f"probe of rclone: {probe_ms:.1f} ms")
