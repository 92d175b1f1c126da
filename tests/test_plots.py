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
    assert main(["plot", str(run), "--out", str(tmp_path / "fig")]) == 2
    assert "no z_true" in capsys.readouterr().err
    assert main(["plot", str(tmp_path / "nothing"), "--out", str(tmp_path / "fig")]) == 2
