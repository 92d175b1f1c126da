"""The Distributed Map simulator, its calibration on the published CAI runs, and the planner."""

from __future__ import annotations

import json

import pytest

from cosmicai.simulator import calibrate, planner
from cosmicai.simulator.simulate import DEFAULT_PARAMS, MIB, Workload, lambda_vcpus, max_overlap, simulate
from cosmicai.errors import ConfigError

GIB = 1024**3
REF = calibrate.reference_dir()
needs_ref = pytest.mark.skipif(REF is None, reason="published CAI results (../shared/reference/cai or "
                                                   "$CAI_REFERENCE_DIR) are not on this machine")


def wl(data_gb: float, part_mb: float = 25, **kw) -> Workload:
    return Workload(data_bytes=int(data_gb * GIB), partition_bytes=int(part_mb * MIB), **kw)


def test_workload_ranks_match_the_original():
    # the original's num_worlds for (partition MB, data GB)
    for part, data, worlds in [(25, 1, 41), (25, 12.6, 517), (50, 12.6, 259), (75, 12.6, 173),
                               (100, 1, 11), (100, 12.6, 130), (100, 1000, 10240), (100, 983, 10066)]:
        assert wl(data, part).ranks == worlds
    w = wl(12.6, 25)
    counts = w.partition_samples()
    assert counts[0] == 1278 and len(counts) == 517 and 0 < counts[-1] <= 1278
    assert w.samples == counts.sum()


def test_same_seed_same_timeline_other_seed_differs():
    a = simulate(wl(2), seed=7)
    b = simulate(wl(2), seed=7)
    c = simulate(wl(2), seed=8)
    assert a.to_dict(timeline=True) == b.to_dict(timeline=True)
    assert a.map_s != c.map_s


def test_timeline_is_consistent():
    r = simulate(wl(4, 25, max_concurrency=50), seed=1)
    assert r.ranks == 164 and len(r.timeline) == 164
    assert sorted(t.rank for t in r.timeline) == list(range(164))
    for t in r.timeline:
        assert r.init_s <= t.launch <= t.start < t.end
        assert t.billed_s == pytest.approx(t.end - t.start)
    # one cold start per environment, each environment's first task is the cold one
    assert r.cold_starts == r.environments <= 50
    first = {}
    for t in sorted(r.timeline, key=lambda t: t.start):
        first.setdefault(t.env, t)
    assert all(t.cold == (first[t.env] is t) for t in r.timeline)
    assert r.peak_concurrency == max_overlap(r.timeline) <= 50
    assert r.map_s == pytest.approx(max(t.end for t in r.timeline) - r.init_s)
    assert r.total_s == pytest.approx(r.init_s + r.map_s + r.summarize_s)
    assert r.billed_seconds == pytest.approx(sum(t.billed_s for t in r.timeline))
    assert r.cost["map"]["num_requests"] == 164 and r.cost["total"] > r.cost["map"]["total"] > 0


def test_warm_environments_are_reused():
    params = DEFAULT_PARAMS.with_(jitter_sigma=0.0, straggler_prob=0.0)
    r = simulate(wl(1, 25, max_concurrency=5), params)
    assert r.cold_starts == 5 and r.ranks == 41
    cold = [t.billed_s for t in r.timeline if t.cold]
    warm = [t.billed_s for t in r.timeline if not t.cold and t.rank != r.ranks - 1]
    assert min(cold) - max(warm) == pytest.approx(params.cold_start_s)


def test_account_limit_throttles_and_burst_scaling_caps_new_environments():
    params = DEFAULT_PARAMS.with_(account_concurrency=100)
    r = simulate(wl(50, 25), params)          # 2048 ranks, Map MaxConcurrency 10,000
    assert r.peak_concurrency <= 100 and r.environments <= 100 and r.throttled > 0
    # burst: at most burst_step environments in the first interval even with a high account limit
    params = DEFAULT_PARAMS.with_(account_concurrency=5000, burst_step=300, launch_rate=1000.0,
                                  launch_rate_max=1000.0)
    r = simulate(wl(50, 25), params)
    first = min(t.start for t in r.timeline)
    early = [t for t in r.timeline if t.start < first + params.burst_interval_s - 1e-6]
    assert max_overlap(early) <= 300
    assert r.peak_concurrency > 300          # it scales further after the first interval


def test_more_concurrency_is_never_slower():
    times = [simulate(wl(12.6, 25, max_concurrency=c), seed=3).map_s for c in (10, 50, 200, 1000, 10000)]
    assert all(b <= a + 1e-9 for a, b in zip(times, times[1:])), times
    assert times[0] > 2 * times[-1]


def test_more_data_is_never_cheaper():
    costs = [simulate(wl(g, 25), seed=0).cost["total"] for g in (0.5, 1, 2, 4, 12.6, 40)]
    assert all(b > a for a, b in zip(costs, costs[1:])), costs


def test_monotone_in_per_sample_time():
    runs = [simulate(wl(4, 50), DEFAULT_PARAMS.with_(per_sample_s=ps), seed=2)
            for ps in (0.001, 0.002, 0.004, 0.008)]
    assert all(b.map_s > a.map_s for a, b in zip(runs, runs[1:]))
    assert all(b.cost["total"] > a.cost["total"] for a, b in zip(runs, runs[1:]))


def test_memory_sets_vcpu_share_and_speed():
    assert lambda_vcpus(1769) == pytest.approx(1.0) and lambda_vcpus(10240) == pytest.approx(6.0)
    mems = [1024, 2048, 4096, 8192, 10240]
    per = [DEFAULT_PARAMS.per_sample_at(m) for m in mems]
    assert all(b < a for a, b in zip(per, per[1:]))
    assert DEFAULT_PARAMS.per_sample_at(10240) == pytest.approx(DEFAULT_PARAMS.per_sample_s)


def test_bad_inputs_name_the_field():
    with pytest.raises(ConfigError, match="memory_mb"):
        wl(1, 25, memory_mb=20000)
    with pytest.raises(ConfigError, match="max_concurrency"):
        wl(1, 25, max_concurrency=20000)
    with pytest.raises(ConfigError, match="cold_start_s"):
        DEFAULT_PARAMS.with_(cold_start_s=-1.0)
    with pytest.raises(ConfigError, match="unknown"):
        DEFAULT_PARAMS.with_(warp_speed=9)
    with pytest.raises(ConfigError, match="partition_bytes"):
        Workload(data_bytes=10**6, partition_bytes=100)
    with pytest.raises(ConfigError, match="seed"):
        simulate(wl(1), seed=-1)


@needs_ref
def test_published_fit_median_error_within_20_percent():
    cells = calibrate.load_cells(REF)
    assert len(cells) == 36          # 28 execution-time cells + 4 state-machine cells x (map, total)
    assert sum(c.source == "total_execution_time" for c in cells) == 28
    cell = next(c for c in cells if c.partition_mb == 25 and c.data_gb == 12.6)
    assert cell.ranks == 517 and cell.observed_s == pytest.approx((59.789 + 55.076 + 55.607) / 3)
    rows = calibrate.predict(cells, DEFAULT_PARAMS)
    print("\n" + calibrate.format_table(rows))
    assert calibrate.median_ape(rows) <= 0.20


@needs_ref
def test_record_shape_and_fit_improve_a_perturbed_start():
    shape = calibrate.record_shape(calibrate.load_records(REF))
    assert 0.03 < shape["jitter_sigma"] < 0.3 and 0.0 < shape["straggler_prob"] < 0.1
    assert shape["straggler_factor"] > 2 and 1e-3 < shape["per_sample_s"] < 1e-2
    cells = [c for c in calibrate.load_cells(REF) if c.partition_mb == 25]
    start = DEFAULT_PARAMS.with_(per_sample_s=DEFAULT_PARAMS.per_sample_s * 4)
    before = calibrate._loss(calibrate.predict(cells, start, seeds=(0,)))
    fitted, after = calibrate.fit(cells, start, free=("per_sample_s",), rounds=2, seeds=(0,))
    assert after < 0.7 * before
    assert fitted.per_sample_s < start.per_sample_s


def test_reference_dir_rejects_a_wrong_folder(tmp_path):
    from cosmicai.errors import DataError
    with pytest.raises(DataError, match="total_execution_time.csv"):
        calibrate.reference_dir(tmp_path)


def _check_plan(result: planner.PlanResult):
    rec = result.recommended
    assert rec is not None and rec.feasible
    # the fastest feasible option, or one within the 1% tie band that is cheaper
    assert all(o.total_s >= rec.total_s / (1 + planner.TIE) - 1e-9 for o in result.options if o.feasible)
    assert result.options[0] is rec
    assert rec.total_s == pytest.approx(rec.map_s + result.params.init_base_s + result.params.summarize_base_s
                                        + result.params.summarize_per_rank_s * rec.ranks)
    assert rec.peak_concurrency <= min(rec.max_concurrency, result.params.account_concurrency)
    assert rec.cost_usd > 0


def test_planner_12_6_gb_is_printed_and_sane():
    result = planner.plan(int(12.6 * GIB), partitions_mb=(25, 100, 400), memory_mb=(1024, 10240),
                          concurrency=(250, 1000))
    print("\n" + planner.format_plan(result))
    for fig in calibrate.published_figures(int(12.6 * GIB)):
        print(calibrate.format_published([fig]))
    assert len(result.options) == 12 and result.original.ranks == 517
    _check_plan(result)
    assert 10 < result.recommended.total_s < 300
    bad = [o for o in result.options if o.partition_mb == 400 and o.memory_mb == 1024]
    assert bad and not bad[0].feasible and "needs" in bad[0].reason
    cheap = planner.plan(int(12.6 * GIB), goal="cost", partitions_mb=(25, 100, 400), memory_mb=(1024, 10240),
                         concurrency=(250, 1000))
    assert cheap.recommended.cost_usd <= result.recommended.cost_usd
    assert all(o.cost_usd >= cheap.recommended.cost_usd / (1 + planner.TIE) - 1e-12
               for o in cheap.options if o.feasible)
    bounded = planner.plan(int(12.6 * GIB), goal="cost", partitions_mb=(25, 100, 400), memory_mb=(1024, 10240),
                           concurrency=(250, 1000), max_time_s=60.0)
    assert bounded.recommended.total_s <= 60.0


def test_planner_1_tb_is_printed_and_sane():
    result = planner.plan(1000 * GIB, partitions_mb=(100, 400), memory_mb=(3008, 10240), concurrency=(1000,))
    print("\n" + planner.format_plan(result))
    _check_plan(result)
    assert result.recommended.ranks in (10240, 2560)
    assert 60 < result.recommended.total_s < 4 * 3600
    # 1 TB on a 1,000-concurrency account cannot beat the 12.6 GB plan
    small = planner.plan(int(12.6 * GIB), partitions_mb=(100, 400), memory_mb=(3008, 10240), concurrency=(1000,))
    assert result.recommended.total_s > small.recommended.total_s
    assert result.recommended.cost_usd > 50 * small.recommended.cost_usd


def test_speed_params_from_a_measured_speed():
    p = planner.speed_params(DEFAULT_PARAMS, samples_per_sec=250.0)
    assert p.per_sample_s == pytest.approx(1 / 250)
    p2 = planner.speed_params(DEFAULT_PARAMS, samples_per_sec=250.0, measured_vcpus=2.0)
    assert p2.per_sample_s == pytest.approx((1 / 250) * (2 / 6) ** DEFAULT_PARAMS.thread_scaling)
    assert planner.speed_params(DEFAULT_PARAMS, speedup=2.0).per_sample_s == pytest.approx(
        DEFAULT_PARAMS.per_sample_s / 2)
    with pytest.raises(ConfigError, match="samples_per_sec"):
        planner.speed_params(DEFAULT_PARAMS, samples_per_sec=0)


def test_cai_plan_command(tmp_path, capsys):
    from cosmicai import cli
    out_json = tmp_path / "plan.json"
    rc = cli.main(["plan", "--data-size", "12.6GB", "--memory-options", "4096", "10240", "--concurrency",
                   "1000", "--partition-sizes", "25MB", "100MB", "--samples-per-sec", "400", "--json",
                   str(out_json)])
    text = capsys.readouterr().out
    assert rc == 0 and "recommended:" in text and "original config" in text
    assert "published [paper, inference]: 12.6 GB" in text and "28.0 s" in text
    data = json.loads(out_json.read_text())
    assert len(data["options"]) == 4 and data["per_sample_s"] == pytest.approx(1 / 400)
    assert data["recommended"]["partition_mb"] in (25, 100)


@needs_ref
def test_published_figures_for_1_tb():
    figs = calibrate.published_figures(1024 * GIB)      # "1TB" finds the 1000 GB runs
    assert {(f["source"], f["metric"]) for f in figs} == {("state_machine_logs", "map"),
                                                          ("state_machine_logs", "total")}
    total = next(f for f in figs if f["metric"] == "total")
    assert total["ranks"] == 10240 and total["seconds"] == pytest.approx((246.87 + 242.6 + 220.97) / 3)
    assert total["cost"]["usd"] > 0 and total["cost"]["records"].endswith("total1000GB")
    assert calibrate.published_figures(300 * GIB) == []


def test_cai_plan_bad_input(capsys):
    from cosmicai import cli
    assert cli.main(["plan"]) == 2
    assert "--data-size" in capsys.readouterr().err
    assert cli.main(["plan", "--data-size", "lots"]) == 2
    assert "lots" in capsys.readouterr().err
    assert cli.main(["plan", "--data-size", "1GB", "--memory-options", "99999"]) == 2
    assert "99999" in capsys.readouterr().err
