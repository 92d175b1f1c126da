"""Rebuild the weight-free ONNX graph template the package ships (src/cosmicai/models/graphs/).

Run after changing the network, its inference rewrites or the exporter (tests/test_onnx_template.py fails while
the shipped template is stale). Needs the full install (torch, onnx):

    python scripts/build_onnx_template.py [--out FOLDER]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

from cosmicai.models.astromae.onnx_export import build_template
from cosmicai.models.astromae.ort_engine import template_dir


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="folder to write (default: the package's models/graphs)")
    args = parser.parse_args()
    out = args.out or template_dir()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="cai-template-") as tmp:
        manifest = build_template(tmp)  # checked against fresh exports before anything is replaced
        os.makedirs(out, exist_ok=True)
        for name in os.listdir(out):
            if name.endswith(".onnx") or name == "template.json":
                os.remove(os.path.join(out, name))
        for name in os.listdir(tmp):
            shutil.copy2(os.path.join(tmp, name), os.path.join(out, name))
    size = sum(os.path.getsize(os.path.join(out, n)) for n in os.listdir(out))
    externals = sum(len(g["externals"]) for g in manifest["graphs"].values())
    print(f"wrote {len(manifest['graphs'])} graphs ({externals} weights bound at load) to {out}: "
          f"{size / 1e3:.0f} kB in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
