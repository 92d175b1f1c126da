"""Build the oracle model, randomise it, save it the authors' way and record its own forward.

Usage: python make_checkpoints.py OUT_DIR [--seed N]   (run with this folder first on sys.path, as a script)

Writes to OUT_DIR:
  whole_cpu.pt         torch.save(nn.DataParallel(model)), as the authors saved theirs
  whole_gpu.pt         the same bytes layout with every storage tagged 'cuda:0' (as a GPU-saved file is)
  whole_sequential.pt  encoder blocks held in an nn.Sequential instead of a ModuleList
  state_module.pt      the DataParallel state dict (keys start with 'module.')
  state_plain.pt       the bare model's state dict
  depth6.pt            a 6-block encoder, saved whole
  forward.npz          images, magnitudes (float64, as the original partitions hold them), z = model's forward
  info.json            parameter counts and the state-dict size
"""

import argparse
import json
import os
import sys

import numpy as np
import torch
from torch import nn

from blocks.model_mae_5chnnl import encoder_parts
from blocks.model_vit_inception import ViT_Astro


def build(depth=12, sequential=False, seed=0):
    torch.manual_seed(seed)
    model = ViT_Astro(192, encoder_parts(depth, sequential))
    with torch.no_grad():
        model.cls_token.normal_(0, 0.02)
        model.pos_embed.normal_(0, 0.02)
        for m in model.modules():  # non-trivial BatchNorm, so folding it is really exercised
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.num_batches_tracked.fill_(1000)
            elif isinstance(m, nn.LayerNorm):
                m.weight.uniform_(0.8, 1.2)
                m.bias.uniform_(-0.1, 0.1)
    return model.eval()


def inputs(n=64, seed=1):
    rng = np.random.default_rng(seed)
    images = rng.lognormal(-2.0, 1.0, (n, 5, 32, 32)).astype(np.float32) - 0.1
    mags = rng.normal(18.0, 1.2, (n, 5))  # float64
    return images, mags


def forward(model, images, mags):
    with torch.no_grad():
        return model([torch.from_numpy(images), torch.from_numpy(mags)]).squeeze(1).double().numpy()


def calibrate_output(model, images, mags):
    """Scale the last layer so outputs look like redshifts (about 0.5 +- 0.2): |dz| is then meaningful."""
    z = forward(model, images, mags)
    last = model.concat_block[2]
    with torch.no_grad():
        last.weight.mul_(0.2 / max(z.std(), 1e-12))
        last.bias.copy_(last.bias * 0.2 / max(z.std(), 1e-12))
    z = forward(model, images, mags)
    with torch.no_grad():
        last.bias.add_(0.5 - z.mean())


def gpu_tagged_save(obj, path):
    """torch.save with every storage's location recorded as 'cuda:0' (no GPU needed to write it)."""
    from torch import serialization

    def tagger(storage):
        return "cuda:0"

    def deserializer(storage, location):
        return None

    serialization.register_package(-100, tagger, deserializer)
    try:
        torch.save(obj, path)
    finally:
        serialization._package_registry[:] = [e for e in serialization._package_registry if e[1] is not tagger]


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    images, mags = inputs()
    model = build(seed=a.seed)
    calibrate_output(model, images, mags)
    torch.save(nn.DataParallel(model), os.path.join(a.out, "whole_cpu.pt"))
    gpu_tagged_save(nn.DataParallel(model), os.path.join(a.out, "whole_gpu.pt"))
    torch.save(nn.DataParallel(model).state_dict(), os.path.join(a.out, "state_module.pt"))
    torch.save(model.state_dict(), os.path.join(a.out, "state_plain.pt"))
    np.savez(os.path.join(a.out, "forward.npz"), images=images, magnitudes=mags, z=forward(model, images, mags))

    seq = build(sequential=True, seed=a.seed)
    seq.load_state_dict(model.state_dict())
    torch.save(nn.DataParallel(seq), os.path.join(a.out, "whole_sequential.pt"))
    torch.save(nn.DataParallel(build(depth=6, seed=a.seed)), os.path.join(a.out, "depth6.pt"))
    info = {"n_params": sum(p.numel() for p in model.parameters()),
            "state_dict_tensors": len(nn.DataParallel(model).state_dict()),
            "python": sys.version.split()[0], "torch": torch.__version__}
    with open(os.path.join(a.out, "info.json"), "w") as f:
        json.dump(info, f)
    print(json.dumps(info))


if __name__ == "__main__":
    main()
