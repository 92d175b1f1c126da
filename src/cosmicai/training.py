"""Train the demo AstroMAE weights on synthetic galaxies (``cai model train-demo`` / ``python -m cosmicai.training``).

The data come from :func:`cosmicai.data.synth.synthesize` with a fixed seed: training galaxies are object ids
``0 .. n_train-1``, the held-out set is ``HOLDOUT_FIRST_ID ..`` (never seen in training, used only for the
scores on the model card). Both are cached in ``--cache`` so a rerun or a resume does not render them again.
Training checkpoints every epoch to ``--workdir`` and resumes from there.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict
from typing import Any, Callable

import numpy as np

HOLDOUT_FIRST_ID = 10_000_000
DEFAULT_WORKDIR = "scratch/model/train"


def synth_cached(path: str, n: int, seed: int, first_id: int, workers: int | None) -> dict[str, np.ndarray]:
    """``n`` synthetic galaxies (ids ``first_id..``) rendered once and cached as .npz at ``path``.

    While a renderer works on ``path`` it holds ``path + '.lock'``; other callers wait for it instead of
    rendering the same galaxies twice (a separate ``--generate-only`` process can fill the cache ahead).
    """
    lock = path + ".lock"
    while not os.path.exists(path) and os.path.exists(lock) and time.time() - os.path.getmtime(lock) < 3600:
        time.sleep(5)
    if os.path.exists(path):
        with np.load(path) as f:
            data = {k: f[k] for k in f.files}
        if len(data["redshift"]) == n and int(data["object_id"][0]) == first_id and int(data["seed"]) == seed:
            return data
    from .data.synth import synthesize

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(lock, "w") as f:
        f.write(str(os.getpid()))
    try:
        t0 = time.time()
        part = synthesize(n, seed=seed, workers=workers, first_id=first_id)
        data = {"images": part.images, "magnitudes": part.magnitudes, "redshift": part.redshift,
                "object_id": part.object_id, "seed": np.int64(seed)}
        tmp = path + ".tmp.npz"
        np.savez(tmp, **data)
        os.replace(tmp, path)
    finally:
        os.remove(lock)
    print(f"synthesised {n} galaxies (seed {seed}, ids {first_id}..) in {time.time() - t0:.0f} s -> {path}",
          flush=True)
    return data


def chunk_ids(n_train: int, chunk: int) -> list[tuple[int, int]]:
    """(first id, rows) of each training-data chunk."""
    return [(s, min(chunk, n_train - s)) for s in range(0, n_train, chunk)]


def train_chunk(args: argparse.Namespace, k: int) -> dict[str, np.ndarray]:
    """Training chunk ``k`` (rendered on first use)."""
    first, rows = chunk_ids(args.n_train, args.chunk)[k]
    return synth_cached(os.path.join(args.cache, f"train-s{args.seed}-{first}-{rows}.npz"), rows, args.seed, first,
                        args.workers)


def holdout(args: argparse.Namespace) -> dict[str, np.ndarray]:
    """The held-out galaxies (ids from HOLDOUT_FIRST_ID; never used for training or early stopping)."""
    return synth_cached(os.path.join(args.cache, f"holdout-{args.n_holdout}-s{args.seed}.npz"), args.n_holdout,
                        args.seed, HOLDOUT_FIRST_ID, args.workers)


def fit_norm(images: np.ndarray, magnitudes: np.ndarray, redshift: np.ndarray):
    """Input normalisation from the training set: per-band robust image scale + asinh, magnitude and z scaling."""
    from .models.weights_io import InputNorm

    sample = images[: min(len(images), 5000)]
    per_band = sample.transpose(1, 0, 2, 3).reshape(5, -1)
    med = np.median(per_band, axis=1)
    mad = np.median(np.abs(per_band - med[:, None]), axis=1) * 1.4826  # ~ sky noise per band
    return InputNorm(image_offset=[0.0] * 5, image_scale=[float(max(s, 1e-6)) for s in mad], image_asinh=True,
                     mag_offset=[float(v) for v in magnitudes.mean(0)],
                     mag_scale=[float(v) for v in magnitudes.std(0)],
                     z_offset=float(redshift.mean()), z_scale=float(redshift.std()))


def scores(z_pred: np.ndarray, z_true: np.ndarray) -> dict[str, float]:
    """The AstroMAE metrics (``pipeline.metrics.redshift_metrics``) under the model card's key names."""
    from .pipeline.metrics import redshift_metrics

    m = redshift_metrics(z_pred, z_true)
    return {"MAE": m["MAE"], "MSE": m["MSE"], "bias": m["Bias"], "precision": m["Precision"], "R2": m["R2"],
            "outlier_fraction": m["outlier_fraction"], "n": m["n"]}


def _augment(images, gen):
    """Random flips and 90-degree rotations (galaxy images have no preferred orientation)."""
    import torch

    k = int(torch.randint(0, 4, (1,), generator=gen))
    if k:
        images = torch.rot90(images, k, dims=(2, 3))
    if bool(torch.randint(0, 2, (1,), generator=gen)):
        images = images.flip(3)
    return images


def evaluate(model, images: np.ndarray, mags: np.ndarray, batch: int = 1024) -> np.ndarray:
    """Predictions of ``model`` (a Normalized module) in eval mode."""
    import torch

    model.eval()
    out = []
    with torch.inference_mode():
        for s in range(0, len(images), batch):
            out.append(model(torch.from_numpy(images[s:s + batch]), torch.from_numpy(mags[s:s + batch])).numpy())
    return np.concatenate(out)


def train(args: argparse.Namespace) -> dict:
    """Run (or resume) demo training; writes the fp16 weights and the JSON card; returns the card.

    Training runs ``--steps`` AdamW steps in rounds of ``--round-steps``; round r draws batches from the
    first r+1 data chunks (all of them from round ``n_chunks - 1`` on), so rendering can overlap training and
    the result still depends only on the arguments. The first ``--n-val`` training ids are kept out of
    training and only monitored.
    """
    import torch
    from torch import nn

    from .models.astromae.network import build_astromae, count_params
    from .models.registry import load_model
    from .models.astromae.weights_torch import Normalized, save_weights

    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    os.makedirs(args.workdir, exist_ok=True)
    n_chunks = len(chunk_ids(args.n_train, args.chunk))
    first = train_chunk(args, 0)
    n_val = args.n_val
    x_va, m_va, z_va = first["images"][:n_val], first["magnitudes"][:n_val], first["redshift"][:n_val]
    norm = fit_norm(first["images"][n_val:], first["magnitudes"][n_val:], first["redshift"][n_val:])
    model = Normalized(build_astromae(seed=args.seed), norm)
    is_decay = {n: p.ndim >= 2 and n not in ("net.pos_embed", "net.cls_token") for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([
        {"params": [p for n, p in model.named_parameters() if is_decay[n]], "weight_decay": args.weight_decay},
        {"params": [p for n, p in model.named_parameters() if not is_decay[n]], "weight_decay": 0.0}], lr=args.lr)
    sched = one_cycle(opt, args.lr, args.steps)
    ckpt = os.path.join(args.workdir, "checkpoint.pt")
    step, history, train_seconds = 0, [], 0.0
    if os.path.exists(ckpt) and not args.restart:
        state = torch.load(ckpt, map_location="cpu", weights_only=True)  # our own file: tensors + plain data
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        step, history, train_seconds = int(state["step"]), json.loads(state["history"]), float(state["seconds"])
        print(f"resumed from {ckpt} at step {step}", flush=True)
    rounds = math.ceil(args.steps / args.round_steps)
    for r in range(step // args.round_steps, rounds):
        chunks = [train_chunk(args, k) for k in range(min(r + 1, n_chunks))]
        x_all = torch.from_numpy(np.concatenate([c["images"] for c in chunks])[n_val:])
        m_all = torch.from_numpy(np.concatenate([c["magnitudes"] for c in chunks])[n_val:])
        z_all = np.concatenate([c["redshift"] for c in chunks])[n_val:]
        z_t = torch.from_numpy((z_all - norm.z_offset) / norm.z_scale)
        del chunks
        gen = torch.Generator().manual_seed(args.seed * 1000 + r)
        model.train()
        t0, run_loss = time.time(), 0.0
        last = min(args.steps, (r + 1) * args.round_steps)
        n_steps = last - r * args.round_steps
        for i in range(n_steps):
            idx = torch.randint(0, len(z_t), (args.batch,), generator=gen)
            x = _augment(x_all[idx], gen)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
                raw = model.net(_norm_images(model, x), (m_all[idx] - model.mag_off) * model.mag_inv)
            # train on the standardised target; the Normalized wrapper maps back to redshift at inference
            loss = nn.functional.smooth_l1_loss(raw.float(), z_t[idx], beta=0.5)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            run_loss += loss.item()
            if (i + 1) % args.log_every == 0:
                print(f"round {r + 1}/{rounds} step {r * args.round_steps + i + 1}/{args.steps} "
                      f"loss {run_loss / (i + 1):.4f} lr {sched.get_last_lr()[0]:.2e} "
                      f"{(time.time() - t0) / (i + 1):.2f} s/step", flush=True)
        step = last
        train_seconds += time.time() - t0
        val = scores(evaluate(model, x_va, m_va), z_va)
        history.append({"round": r + 1, "step": step, "train_rows": len(z_t), "loss": run_loss / max(n_steps, 1),
                        "seconds": round(time.time() - t0, 1), "val": val})
        print(f"round {r + 1}: step {step} rows {len(z_t)} loss {run_loss / max(n_steps, 1):.4f} "
              f"val {json.dumps(val)}", flush=True)
        tmp = ckpt + ".tmp"
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                    "step": step, "history": json.dumps(history), "seconds": train_seconds}, tmp)
        os.replace(tmp, ckpt)
    # fp16 weights; the held-out score goes through the public loader, i.e. exactly what users get
    z_range = training_range(args, min(rounds, n_chunks), n_val)  # the chunks training saw
    blob = save_weights(model.net.state_dict(), norm, dtype=torch.float16,
                        extra_meta={"model": "astromae", "trained_on": TRAINED_ON, "caveat": CAVEAT,
                                    "training_range": z_range})
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp_out = args.out + ".tmp"
    with open(tmp_out, "wb") as f:
        f.write(blob)
    os.replace(tmp_out, args.out)
    ho = holdout(args)
    assert ho["object_id"].min() >= args.n_train, "held-out ids overlap the training ids"
    pred = load_model("astromae", weights=args.out, threads=args.threads).predict(ho["images"], ho["magnitudes"])
    card = {
        "name": "astromae-demo", "file": os.path.basename(args.out), "bytes": len(blob),
        "sha256": hashlib.sha256(blob).hexdigest(), "dtype": "float16",
        "n_params": count_params(model.net), "seed": args.seed,
        "command": getattr(args, "command_line", None) or "python -m cosmicai.training",
        "data": {"generator": "cosmicai.data.synth.synthesize", "seed": args.seed, "synth_sha256": _synth_sha(),
                 "train_ids": [n_val, args.n_train - 1], "monitor_ids": [0, n_val - 1],
                 "holdout_ids": [HOLDOUT_FIRST_ID, HOLDOUT_FIRST_ID + args.n_holdout - 1]},
        "training": {"steps": args.steps, "batch": args.batch, "lr": args.lr, "optimizer": "AdamW",
                     "weight_decay": args.weight_decay, "schedule": "one-cycle cosine (5% warm-up)",
                     "loss": "smooth L1 (beta 0.5) on standardised z", "bf16_autocast": args.bf16,
                     "augment": "rot90 + flip", "seconds": round(train_seconds, 1),
                     "threads": torch.get_num_threads(), "host": platform.machine()},
        "input_norm": asdict(norm), "holdout_scores": scores(pred, ho["redshift"]), "history": history,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "note": "Trained on synthetic galaxies for demos and tests; NOT the AstroMAE paper's SDSS weights.",
        "trained_on": TRAINED_ON, "caveat": CAVEAT, "training_range": z_range,
    }
    with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
        json.dump(card, f, indent=1)
    print(json.dumps(card["holdout_scores"]), flush=True)
    return card


#: What the demo weights' card and metadata say they were trained on, and the caveat every run report repeats.
TRAINED_ON = "synthetic galaxies from cosmicai.data.synth, not real survey images"
CAVEAT = ("trained on synthetic galaxies for demos and tests; not meant for real SDSS images (import the authors' "
          "AstroMAE checkpoint with `cai model import-cai` for those)")


def training_range(args: argparse.Namespace, n_chunks: int, n_val: int) -> dict[str, float]:
    """``{"z_min", "z_max"}`` of the training labels (every training chunk less the first ``n_val`` monitor rows),
    rounded outward to 4 decimals; read from the chunk caches (only their redshift arrays)."""
    z = []
    for k in range(n_chunks):
        first, rows = chunk_ids(args.n_train, args.chunk)[k]
        train_chunk(args, k)  # rendered and cached if it is not yet
        with np.load(os.path.join(args.cache, f"train-s{args.seed}-{first}-{rows}.npz")) as f:
            z.append(np.asarray(f["redshift"], dtype=np.float64))
    labels = np.concatenate(z)[n_val:]
    return {"z_min": math.floor(float(labels.min()) * 1e4) / 1e4, "z_max": math.ceil(float(labels.max()) * 1e4) / 1e4}


def _synth_sha() -> str:
    import hashlib

    from .data import synth

    with open(synth.__file__, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def generate(args: argparse.Namespace) -> None:
    """Render (and cache) every training chunk, then the held-out set."""
    for k in range(len(chunk_ids(args.n_train, args.chunk))):
        train_chunk(args, k)
    holdout(args)


def _norm_images(model, x):
    import torch

    x = (x - model.img_off) * model.img_inv
    return torch.asinh(x) if model.norm.image_asinh else x


#: Where ``--out`` writes by default: the current folder, never the installed package's own demo weights.
DEFAULT_OUT = "astromae-demo-trained.safetensors"


def whole_number(least: int) -> Callable[[str], int]:
    """An argparse type: a whole number >= ``least``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = least - 1
        if value < least:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {least}, got {text!r}")
        return value

    return parse


positive_int, non_negative_int = whole_number(1), whole_number(0)


def one_cycle(opt: Any, lr: float, steps: int) -> Any:
    """The one-cycle cosine LR schedule over ``steps`` (5% warm-up; at least one warm-up step, so short runs work).

    torch's ``OneCycleLR`` divides by the length of each phase; phases of zero length (e.g. 20 steps at 5%)
    divide by zero, and one or two steps leave no room for two phases: those get a constant LR.
    """
    import torch

    if steps < 3:
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    pct_start = 0.05 if 0.05 * steps - 1 >= 1 else 2.0 / steps
    return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=pct_start,
                                               anneal_strategy="cos", div_factor=20, final_div_factor=100)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Training options (shared by ``cai model train-demo``)."""
    p.add_argument("--n-train", type=positive_int, default=16_000, help="training galaxies (ids 0..n-1)")
    p.add_argument("--n-val", type=non_negative_int, default=1_000,
                   help="first training ids kept out and only monitored")
    p.add_argument("--n-holdout", type=positive_int, default=6_000,
                   help=f"held-out galaxies (ids {HOLDOUT_FIRST_ID}..)")
    p.add_argument("--chunk", type=positive_int, default=4_000, help="galaxies per cached data chunk")
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed of the model's initial weights and of "
                   "the batch order (the data are always synthesize(seed=0)); default 0")
    p.add_argument("--steps", type=positive_int, default=450, help="AdamW steps in all (default 450)")
    p.add_argument("--round-steps", type=positive_int, default=75,
                   help="steps per round: a checkpoint is written and one more data chunk joins after each "
                        "(default 75)")
    p.add_argument("--batch", type=positive_int, default=96, help="galaxies per training step (default 96)")
    p.add_argument("--lr", type=float, default=5e-4, help="peak learning rate of the one-cycle schedule "
                   "(default 5e-4)")
    p.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay (default 0.05)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast for the forward pass")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch threads for training (default: torch's own, all cores)")
    p.add_argument("--workers", type=positive_int, default=None, help="synthesis processes (default: all cores)")
    p.add_argument("--cache", default="scratch/model/data", help="folder for the rendered .npz data")
    p.add_argument("--workdir", default=DEFAULT_WORKDIR, help="checkpoint folder (resumed from)")
    p.add_argument("--restart", action="store_true", help="ignore an existing checkpoint")
    p.add_argument("--generate-only", action="store_true", help="only render the data into --cache")
    p.add_argument("--log-every", type=positive_int, default=10, help="print the loss every N steps (default 10)")
    p.add_argument("--out", default=DEFAULT_OUT,
                   help=f"weights file to write, with its card (.json) beside it (default ./{DEFAULT_OUT}); the "
                        "weights shipped with the package are replaced only when named here explicitly")


def run(args: argparse.Namespace) -> int:
    """Entry for the CLI: render the data only, or train."""
    if args.generate_only:
        generate(args)
    else:
        train(args)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cosmicai.training", description=__doc__.splitlines()[0])
    add_arguments(p)
    argv = sys.argv[1:] if argv is None else list(argv)
    args = p.parse_args(argv)
    args.command_line = " ".join(["python -m cosmicai.training", *argv])
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
