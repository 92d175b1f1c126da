"""`cai plan` with our worker's measured cold start and speed (worker profiles) vs the original's constants."""

from __future__ import annotations

import json
import math

import pytest

from cosmicai import cli
from cosmicai.simulator import planner
from cosmicai.simulator.simulate import DEFAULT_PARAMS, lambda_vcpus
from cosmicai.errors import ConfigError

GIB = 1024**3
DATA = int(12.6 * GIB)
#: A small option grid so each plan is a handful of fast simulations.
GRID = ["--partition-sizes", "25MB", "100MB", "--memory-options", "4096", "10240", "--concurrency", "1000"]
GRID_KW = {"partitions_mb": (25.0, 100.0), "memory_mb": (4096, 10240), "concurrency": (1000,)}


def profile_dict(**changes) -> dict:
    data = {"schema": "cosmicai.worker-profile/1", "install": "worker", "engine": "onnxruntime", "mode": "fast",
            "threads": 2, "cold_start_s": 0.8, "import_s": 0.3, "model_load_s": 0.2, "first_batch_s": 0.3,
            "per_galaxy_s": 0.0011, "partition_mb": 100, "galaxies": 5110, "partition_s": 6.1, "peak_rss_mb": 350,
            "machine": {"cpus": 2, "cpu": "test cpu", "python": "3.11.7"},
            "measured_with": "python benchmarks/cold_start.py --test", "date": "2026-12-01",
            "extra_key": [1, 2, 3]}
    data.update(changes)
    return data


def write_profile(tmp_path, name: str = "profile.json", drop: tuple[str, ...] = (), **changes):
    data = profile_dict(**changes)
    for key in drop:
        del data[key]
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


# --- loading and errors

def test_profile_loads_with_extra_keys(tmp_path):
    path = write_profile(tmp_path)
    prof = planner.load_worker_profile(path)
    assert (prof.cold_start_s, prof.per_galaxy_s, prof.threads) == (0.8, 0.0011, 2.0)
    assert prof.path == str(path) and prof.data["extra_key"] == [1, 2, 3]
    assert prof.measured_with == "python benchmarks/cold_start.py --test" and prof.date == "2026-12-01"
    summary = prof.summary()
    assert summary["engine"] == "onnxruntime" and summary["shipped"] is False and "extra_key" not in summary


def test_shipped_profile_is_valid():
    prof = planner.load_worker_profile()
    raw = json.loads(planner.DEFAULT_WORKER_PROFILE.read_text())
    assert raw["schema"] == planner.PROFILE_SCHEMA
    assert (prof.cold_start_s, prof.per_galaxy_s, prof.threads) == (raw["cold_start_s"], raw["per_galaxy_s"],
                                                                    raw["threads"])
    assert prof.summary()["shipped"] is True


@pytest.mark.parametrize("field", ["cold_start_s", "per_galaxy_s", "threads"])
def test_missing_required_field_is_named(tmp_path, field):
    path = write_profile(tmp_path, drop=(field,))
    with pytest.raises(ConfigError) as err:
        planner.load_worker_profile(path)
    assert str(err.value) == f"worker profile {path}: missing required field '{field}'"


@pytest.mark.parametrize("field", ["cold_start_s", "per_galaxy_s", "threads"])
@pytest.mark.parametrize("bad", ["0.8", None, True, 0, -1.0, [1]])
def test_bad_required_field_is_named(tmp_path, field, bad):
    path = write_profile(tmp_path, **{field: bad})
    with pytest.raises(ConfigError) as err:
        planner.load_worker_profile(path)
    assert str(err.value) == f"worker profile {path}: field '{field}' must be a positive number, got {bad!r}"
    assert "\n" not in str(err.value)


def test_non_finite_field_is_named(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps(profile_dict()).replace('"per_galaxy_s": 0.0011', '"per_galaxy_s": NaN'))
    with pytest.raises(ConfigError, match=r"field 'per_galaxy_s' must be a positive number, got nan"):
        planner.load_worker_profile(path)


def test_schema_errors(tmp_path):
    path = write_profile(tmp_path, drop=("schema",))
    with pytest.raises(ConfigError) as err:
        planner.load_worker_profile(path)
    assert str(err.value) == (f"worker profile {path}: missing required field 'schema' "
                              f"(expected 'cosmicai.worker-profile/1')")
    path = write_profile(tmp_path, schema="cosmicai.worker-profile/2")
    with pytest.raises(ConfigError) as err:
        planner.load_worker_profile(path)
    assert str(err.value) == (f"worker profile {path}: field 'schema' must be 'cosmicai.worker-profile/1', "
                              f"got 'cosmicai.worker-profile/2'")


def test_file_errors(tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(ConfigError) as err:
        planner.load_worker_profile(missing)
    assert str(err.value) == f"worker profile {missing}: file not found"
    broken = tmp_path / "broken.json"
    broken.write_text('{"schema": ')
    with pytest.raises(ConfigError, match=rf"worker profile {broken}: not valid JSON \(.* line 1 column 12\)"):
        planner.load_worker_profile(broken)
    listed = tmp_path / "list.json"
    listed.write_text("[1, 2]")
    with pytest.raises(ConfigError, match=r"expected a JSON object, got list"):
        planner.load_worker_profile(listed)


def test_cli_names_the_profile_and_field(tmp_path, capsys):
    path = write_profile(tmp_path, per_galaxy_s="fast")
    assert cli.main(["plan", "--data-size", "1GB", "--worker-profile", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"worker profile {path}: field 'per_galaxy_s' must be a positive number, got 'fast'" in err


# --- the worker basis: mapping, flags, precedence

def test_worker_basis_maps_the_profile_through_the_vcpu_model(tmp_path):
    prof = planner.load_worker_profile(write_profile(tmp_path))
    params, basis = planner.worker_basis(DEFAULT_PARAMS, prof)
    expected = 0.0011 * (2 / lambda_vcpus(10240)) ** DEFAULT_PARAMS.thread_scaling
    assert params.per_sample_s == pytest.approx(expected) == pytest.approx(0.000456768, rel=1e-6)
    # the same mapping as the --samples-per-sec / --measured-vcpus path
    assert params.per_sample_s == pytest.approx(
        planner.speed_params(DEFAULT_PARAMS, 1 / 0.0011, 2.0).per_sample_s)
    assert params.cold_start_s == pytest.approx(planner.PLATFORM_COLD_S + 0.8) == pytest.approx(1.3)
    assert basis.platform_cold_s == 0.5 and basis.process_cold_s == 0.8
    assert basis.process_cold_from == "worker profile" and basis.platform_cold_from == "assumption PLATFORM_COLD_S"
    assert basis.profile["measured_with"] == "python benchmarks/cold_start.py --test"
    # nothing else moves
    assert params.with_(per_sample_s=DEFAULT_PARAMS.per_sample_s, cold_start_s=DEFAULT_PARAMS.cold_start_s) \
        == DEFAULT_PARAMS


def test_flags_override_the_profile(tmp_path):
    prof = planner.load_worker_profile(write_profile(tmp_path))
    p, b = planner.worker_basis(DEFAULT_PARAMS, prof, cold_start_s=3.0)
    assert p.cold_start_s == pytest.approx(3.5) and b.process_cold_from == "--cold-start (flag)"
    assert p.per_sample_s == pytest.approx(0.000456768, rel=1e-6)          # speed still the profile's
    # --per-galaxy-ms: on the profile's threads, or on --measured-vcpus
    p, b = planner.worker_basis(DEFAULT_PARAMS, prof, per_galaxy_s=0.002)
    assert p.per_sample_s == pytest.approx(0.002 * (2 / 6) ** 0.8) and p.cold_start_s == pytest.approx(1.3)
    assert b.speed_from == "--per-galaxy-ms 2 (flag) on the worker profile's threads"
    p, b = planner.worker_basis(DEFAULT_PARAMS, prof, per_galaxy_s=0.002, measured_vcpus=4.0)
    assert p.per_sample_s == pytest.approx(0.002 * (4 / 6) ** 0.8) and b.measured_vcpus == 4.0
    # --samples-per-sec wins over the profile's speed (on 6 vCPUs unless told), --speedup divides
    p, b = planner.worker_basis(DEFAULT_PARAMS, prof, samples_per_sec=400.0, speedup=2.0)
    assert p.per_sample_s == pytest.approx(1 / 400 / 2) and b.speed_from.startswith("--samples-per-sec 400")
    # --platform-cold-start
    p, b = planner.worker_basis(DEFAULT_PARAMS, prof, platform_cold_s=0.0)
    assert p.cold_start_s == pytest.approx(0.8) and b.platform_cold_from == "--platform-cold-start (flag)"
    # flags alone, no profile
    p, b = planner.worker_basis(DEFAULT_PARAMS, None, cold_start_s=1.0, per_galaxy_s=0.001, measured_vcpus=6.0)
    assert (p.cold_start_s, p.per_sample_s, b.profile) == (pytest.approx(1.5), pytest.approx(0.001), None)


def test_worker_basis_rejects_conflicts_and_gaps(tmp_path):
    prof = planner.load_worker_profile(write_profile(tmp_path))
    with pytest.raises(ConfigError, match="give one"):
        planner.worker_basis(DEFAULT_PARAMS, prof, per_galaxy_s=0.001, samples_per_sec=100.0)
    with pytest.raises(ConfigError, match="--measured-vcpus: only applies"):
        planner.worker_basis(DEFAULT_PARAMS, prof, measured_vcpus=2.0)
    with pytest.raises(ConfigError, match="--cold-start: must be a positive number"):
        planner.worker_basis(DEFAULT_PARAMS, prof, cold_start_s=-1.0)
    with pytest.raises(ConfigError, match="cold start is unknown"):
        planner.worker_basis(DEFAULT_PARAMS, None, per_galaxy_s=0.001, measured_vcpus=2.0)
    with pytest.raises(ConfigError, match="--per-galaxy-ms: the vCPUs"):
        planner.worker_basis(DEFAULT_PARAMS, None, cold_start_s=1.0, per_galaxy_s=0.001)
    with pytest.raises(ConfigError, match="--platform-cold-start"):
        planner.worker_basis(DEFAULT_PARAMS, prof, platform_cold_s=-0.1)


def test_faster_worker_gives_a_shorter_plan(tmp_path):
    """Monotonic: a faster cold start or per-galaxy speed never lengthens the predicted time."""
    prof = planner.load_worker_profile(write_profile(tmp_path))
    seeds = (0, 1)

    def total(**kw) -> planner.Option:
        params, _ = planner.worker_basis(DEFAULT_PARAMS, prof, **kw)
        return planner.evaluate(DATA, 25.0, 10240, planner.MAP_MAX_CHILDREN, params, seeds)

    by_speed = [total(per_galaxy_s=s) for s in (0.008, 0.004, 0.002, 0.001)]
    times = [o.total_s for o in by_speed]
    assert all(b < a for a, b in zip(times, times[1:])), times
    assert all(b.cost_usd < a.cost_usd for a, b in zip(by_speed, by_speed[1:]))
    assert times[0] - times[-1] > 10.0          # 1,278 galaxies x (8 - 1) ms x (2/6)^0.8 ~ 3.7 s per task
    by_cold = [total(cold_start_s=c).total_s for c in (20.0, 8.0, 2.0, 0.5)]
    assert all(b < a for a, b in zip(by_cold, by_cold[1:])), by_cold
    assert by_cold[0] - by_cold[-1] > 15.0      # every task of the first wave pays the cold start


# --- the CLI

def test_original_flag_reproduces_the_fitted_constants_exactly(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert cli.main(["plan", "--data-size", "12.6GB", "--original", *GRID, "--json", str(out)]) == 0
    text = capsys.readouterr().out
    data = json.loads(out.read_text())
    ref = planner.plan(DATA, params=DEFAULT_PARAMS, **GRID_KW).to_dict()
    assert data["options"] == ref["options"] and data["recommended"] == ref["recommended"]
    assert data["original"] == ref["original"] and data["params"] == ref["params"]
    assert data["per_sample_s"] == DEFAULT_PARAMS.per_sample_s == 0.0021
    assert data["params"]["cold_start_s"] == DEFAULT_PARAMS.cold_start_s == 2.0
    prov = data["provenance"]
    assert prov["name"] == "original" and prov["profile"] is None
    assert prov["speed_from"] == "original's fitted constant"
    assert "numbers used (the original's fitted constants):" in text
    assert "cold start 2.00 s: original's fitted constant" in text and "worker profile" not in text
    # --samples-per-sec still applies under --original, as before worker profiles
    assert cli.main(["plan", "--data-size", "12.6GB", "--original", "--samples-per-sec", "400", *GRID,
                     "--json", str(out)]) == 0
    capsys.readouterr()
    data = json.loads(out.read_text())
    ref = planner.plan(DATA, params=planner.speed_params(DEFAULT_PARAMS, 400.0), **GRID_KW).to_dict()
    assert data["options"] == ref["options"] and data["per_sample_s"] == pytest.approx(1 / 400)


def test_cli_default_uses_the_profile_and_prints_provenance(tmp_path, capsys):
    path = write_profile(tmp_path)
    out = tmp_path / "plan.json"
    assert cli.main(["plan", "--data-size", "12.6GB", "--worker-profile", str(path), *GRID,
                     "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "numbers used (our worker):" in text
    assert ("cold start 1.30 s = 0.50 s Lambda platform (assumption PLATFORM_COLD_S) + 0.80 s process start -> "
            "first prediction (worker profile)") in text
    assert "speed 1.100 ms/galaxy on 2 vCPUs -> 0.457 ms/sample at 10240 MB" in text
    assert (f"worker profile {path}: measured_with 'python benchmarks/cold_start.py --test', "
            f"date '2026-12-01'; install worker, engine onnxruntime, mode fast, threads 2") in text
    data = json.loads(out.read_text())
    prov = data["provenance"]
    assert prov["name"] == "worker" and prov["profile"]["path"] == str(path)
    assert prov["profile"]["measured_with"] == "python benchmarks/cold_start.py --test"
    assert prov["profile"]["date"] == "2026-12-01"
    assert prov["cold_start_s"] == pytest.approx(1.3) and data["params"]["cold_start_s"] == pytest.approx(1.3)
    assert data["per_sample_s"] == pytest.approx(0.000456768, rel=1e-6)
    params, _ = planner.worker_basis(DEFAULT_PARAMS, planner.load_worker_profile(path))
    assert data["options"] == planner.plan(DATA, params=params, **GRID_KW).to_dict()["options"]


def test_cli_without_profile_flag_uses_the_shipped_one(capsys):
    assert cli.main(["plan", "--data-size", "1GB", "--partition-sizes", "25MB", "--memory-options", "10240",
                     "--concurrency", "1000"]) == 0
    text = capsys.readouterr().out
    shipped = planner.load_worker_profile()
    assert "worker profile shipped cosmicai/simulator/worker_profile.json" in text
    assert f"measured_with {shipped.measured_with!r}" in text
    assert f"{shipped.per_galaxy_s * 1e3:.3f} ms/galaxy on {shipped.threads:g} vCPUs" in text


def test_cli_flags_override_and_are_named(tmp_path, capsys):
    path = write_profile(tmp_path)
    out = tmp_path / "plan.json"
    assert cli.main(["plan", "--data-size", "1GB", "--worker-profile", str(path), "--cold-start", "0.2",
                     "--per-galaxy-ms", "3", *GRID, "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "cold start 0.70 s = 0.50 s Lambda platform (assumption PLATFORM_COLD_S) + 0.20 s" in text
    assert "(--cold-start (flag))" in text and "--per-galaxy-ms 3 (flag) on the worker profile's threads" in text
    data = json.loads(out.read_text())
    assert data["params"]["cold_start_s"] == pytest.approx(0.7)
    assert data["per_sample_s"] == pytest.approx(0.003 * (2 / 6) ** 0.8)


def test_cli_rejects_worker_flags_with_original(tmp_path, capsys):
    path = write_profile(tmp_path)
    for extra in (["--cold-start", "1"], ["--per-galaxy-ms", "1"], ["--worker-profile", str(path)],
                  ["--compare-original"]):
        assert cli.main(["plan", "--data-size", "1GB", "--original", *extra]) == 2
        assert extra[0] in capsys.readouterr().err


def test_compare_original_has_5_10_25_mb_rows(tmp_path, capsys):
    path = write_profile(tmp_path)
    out = tmp_path / "cmp.json"
    assert cli.main(["plan", "--data-size", "12.6GB", "--compare-original", "--worker-profile", str(path),
                     "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "numbers used (the original's fitted constants):" in text and "numbers used (our worker):" in text
    rows = {}
    for line in text.splitlines():
        cells = line.split("|")
        if len(cells) == 4 and cells[0].split()[0].replace(".", "").isdigit():
            part, memory, conc, ranks = cells[0].split()
            rows[float(part)] = (int(memory), int(conc), int(ranks), *map(float, cells[1].split()),
                                 *map(float, cells[2].split()))
    assert sorted(rows) == [5.0, 10.0, 25.0]
    assert [rows[p][2] for p in (5.0, 10.0, 25.0)] == [2581, 1291, 517]
    assert all(rows[p][:2] == (10240, 10000) for p in rows)
    data = json.loads(out.read_text())
    assert [r["original"]["partition_mb"] for r in data["rows"]] == [5, 10, 25]
    assert data["provenance"]["original"]["name"] == "original"
    assert data["provenance"]["worker"]["profile"]["path"] == str(path)
    params, basis = planner.worker_basis(DEFAULT_PARAMS, planner.load_worker_profile(path))
    for row in data["rows"]:
        p = row["original"]["partition_mb"]
        orig = planner.evaluate(DATA, p, 10240, planner.MAP_MAX_CHILDREN, DEFAULT_PARAMS)
        ours = planner.evaluate(DATA, p, 10240, planner.MAP_MAX_CHILDREN, params)
        assert row["original"]["total_s"] == orig.total_s and row["worker"]["total_s"] == ours.total_s
        assert row["original"]["cost_usd"] == orig.cost_usd and row["worker"]["cost_usd"] == ours.cost_usd
        # the printed table shows the same numbers
        assert rows[p][3] == pytest.approx(orig.total_s, abs=0.05) and rows[p][5] == pytest.approx(ours.total_s,
                                                                                                  abs=0.05)
        # a faster worker (1.1 ms/galaxy on 2 threads vs the original's 2.1 ms at 6 vCPUs) is predicted faster
        assert ours.total_s < orig.total_s and ours.cost_usd < orig.cost_usd
    assert math.isclose(data["params"]["original"]["per_sample_s"], 0.0021)
