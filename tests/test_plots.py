"""cai plot: figures exist, are real images (size, dimensions, pixel variance) and bad inputs are explained."""

from __future__ import annotations

import io
import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest

from cosmicai.cli import main
from cosmicai.simulator.calibrate import reference_dir
from cosmicai.errors import DataError

REF = reference_dir() or Path("../shared/reference/cai")  # skipped below when absent


def _check_png(path: Path, min_w: int = 500, min_h: int = 300) -> None:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    assert path.stat().st_size > 10_000, path
    img = plt.imread(path)
    h, w = img.shape[:2]
    assert w >= min_w and h >= min_h, (path, w, h)
    assert float(np.var(img[..., :3])) > 1e-3, f"{path} looks blank"
    pdf = path.with_suffix(".pdf")
    assert pdf.read_bytes()[:5] == b"%PDF-" and pdf.stat().st_size > 5_000


@pytest.mark.skipif(not (REF / "result-partition-25MB").exists(),
                    reason="the original CAI results (../shared/reference/cai or $CAI_REFERENCE_DIR) are not on this machine")
def test_tree_figures_from_the_published_results(tmp_path):
    assert main(["plot", str(REF), "--out", str(tmp_path)]) == 0
    for name in ("time_vs_data_size", "throughput_vs_data_size", "batch_size"):
        _check_png(tmp_path / f"{name}.png")


def _fake_run(root: Path, with_phases: bool = True, with_truth: bool = True) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    run = root / "run"
    run.mkdir(parents=True)
    t0 = datetime(2025, 1, 1, tzinfo=timezone.utc)
    records = []
    for rank in range(4):
        start = t0 + timedelta(seconds=1.5 * (rank // 2))
        rec = {"total_cpu_time (seconds)": 1.4, "total_cpu_memory (MB)": 500.0, "throughput_bps": 1e6,
               "rank": rank, "rows": 100}
        if with_phases:
            rec.update(phases={"model_load": 0.3 if rank < 2 else 0.0, "fetch": 0.2, "decode": 0.1,
                               "inference": 0.7, "write": 0.1},
                       started_at=start.isoformat(), finished_at=(start + timedelta(seconds=1.4)).isoformat(),
                       cpu={"host": "node", "pid": 100 + rank % 2})
        records.append(rec)
    (run / "combined_data.json").write_text(json.dumps(records))
    rng = np.random.default_rng(0)
    z = rng.uniform(0, 0.4, 3000).astype(np.float32)
    cols = {"object_id": np.arange(3000), "z_pred": (z + rng.normal(0, 0.02, 3000)).astype(np.float32)}
    if with_truth:
        cols["z_true"] = z
    sink = io.BytesIO()
    pq.write_table(pa.table(cols), sink)
    (run / "predictions.parquet").write_bytes(sink.getvalue())
    return run


def test_run_figures(tmp_path, capsys):
    run = _fake_run(tmp_path)
    assert main(["plot", str(run), "--out", str(tmp_path / "fig")]) == 0
    out = capsys.readouterr().out
    assert "redshift_scatter.png" in out and "timeline.png" in out
    _check_png(tmp_path / "fig" / "redshift_scatter.png", 400, 400)
    _check_png(tmp_path / "fig" / "timeline.png", 600, 150)


def test_run_without_phases_or_truth_is_explained(tmp_path, capsys):
    from cosmicai.analysis.plots import plot_predictions, plot_timeline

    run = _fake_run(tmp_path, with_phases=False, with_truth=False)
    with pytest.raises(DataError, match="no 'phases'"):
        plot_timeline(str(run), str(tmp_path / "fig"))
    with pytest.raises(DataError, match="no z_true column"):
        plot_predictions(str(run), str(tmp_path / "fig"))
    assert main(["plot", str(tmp_path / "nothing"), "--out", str(tmp_path / "fig")]) == 2
    assert "nothing" in capsys.readouterr().err
    (run / "predictions.parquet").unlink()  # neither figure of a run can be drawn: both reasons are given
    assert main(["plot", str(run), "--out", str(tmp_path / "fig")]) == 2
    err = capsys.readouterr().err
    assert "no predictions.parquet" in err and "no 'phases'" in err


def _write_predictions(run: Path, z_pred, z_true=None, flag=None) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    cols = {"object_id": np.arange(len(z_pred)), "z_pred": np.asarray(z_pred, dtype=np.float32)}
    if z_true is not None:
        cols["z_true"] = np.asarray(z_true, dtype=np.float32)
    if flag is not None:
        cols["flag"] = np.asarray(flag, dtype=bool)
    pq.write_table(pa.table(cols), run / "predictions.parquet")


@pytest.mark.parametrize("with_truth", [True, False])
def test_nz_of_the_predictions_for_every_run(tmp_path, capsys, with_truth):
    import pyarrow.parquet as pq

    from cosmicai.analysis.plots import nz_figure

    run = _fake_run(tmp_path, with_phases=False, with_truth=False)
    rng = np.random.default_rng(1)
    z_true = rng.uniform(0.02, 0.4, 2000)
    z_pred = z_true + rng.normal(0, 0.02, 2000)
    z_pred[:7] = np.nan  # non-finite predictions are flagged rows
    flag = np.zeros(2000, dtype=bool)
    flag[:50] = True
    _write_predictions(run, z_pred, z_true if with_truth else None, flag)

    fig = nz_figure(pq.read_table(run / "predictions.parquet"))
    ax = fig.axes[0]
    assert ax.get_xlabel() == "redshift z" and ax.get_ylabel() == "galaxies per bin"
    assert "50 flagged row(s) excluded" in ax.get_title()
    predicted = ax.containers[0]
    assert sum(bar.get_height() for bar in predicted) == 1950  # the unflagged rows, every one of them
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    if with_truth:
        assert labels == ["predicted (N = 1,950)", "true (N = 1,950)"]
        counts, _ = np.histogram(z_true[50:], bins=[b.get_x() for b in predicted] + [predicted[-1].get_x()
                                                                                   + predicted[-1].get_width()])
        step = ax.patches[-1].get_xy()  # the true n(z) drawn as a step line over the same bins
        assert step[:, 1].max() == counts.max() and counts.sum() == 1950
    else:
        assert labels == ["predicted (N = 1,950)"]

    assert main(["plot", str(run), "--out", str(tmp_path / "fig")]) == 0  # no phases, maybe no z_true: n(z) still
    out = capsys.readouterr().out
    _check_png(tmp_path / "fig" / "redshift_nz.png", 500, 300)
    assert ("redshift_scatter.png" in out) == with_truth and "timeline.png" not in out
