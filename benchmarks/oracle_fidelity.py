"""max |dz| of cosmicai's AstroMAE against the authors' network, for each engine and mode.

    python benchmarks/oracle_fidelity.py [--seed 0]

Builds the oracle of the authors' code (tests/astromae_original, in a subprocess), randomises and saves it their
way, imports it with ``cai model import-cai`` and prints max |dz| = max |z - z_oracle| / (1 + z_oracle) on the
oracle's 64 rows, plus both parameter counts. The test suite holds exact mode to 1e-5
(tests/test_model_fidelity.py); fast mode's figure on these random weights is what the fast-mode guard catches.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ORACLE = Path(__file__).resolve().parents[1] / "tests" / "astromae_original" / "make_checkpoints.py"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    from cosmicai.cli import main as cai
    from cosmicai.models.registry import load_model

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        subprocess.run([sys.executable, str(ORACLE), str(out), "--seed", str(a.seed)], check=True, capture_output=True)
        info = json.loads((out / "info.json").read_text())
        cai(["model", "import-cai", str(out / "whole_cpu.pt"), "--out", str(out / "w.safetensors")])
        f = np.load(out / "forward.npz")
        images, mags, want = f["images"], f["magnitudes"].astype(np.float32), f["z"]
        print(f"parameters: authors' module {info['n_params']:,}; ours "
              f"{load_model('astromae', weights=str(out / 'w.safetensors')).n_params:,}")
        print(f"{'engine':<12} {'mode':<6} {'max |dz|':>9}")
        for engine in ("torch", "onnxruntime"):
            for mode in ("exact", "fast"):
                pred = load_model("astromae", weights=str(out / "w.safetensors"), engine=engine, mode=mode, threads=2)
                z = pred.predict(images, mags).astype(np.float64)
                print(f"{engine:<12} {mode:<6} {np.max(np.abs(z - want) / (1 + want)):>9.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
