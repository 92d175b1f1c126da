"""``cai model``: import the original checkpoint, train the demo weights, describe a model."""

from __future__ import annotations

import argparse
import json

from ..models.modes import ENGINES, MODES


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``cai model import-cai | train-demo | info``."""
    parser = subparsers.add_parser("model", help="AstroMAE weights: import, train the demo model, info")
    sub = parser.add_subparsers(dest="model_command", metavar="SUBCOMMAND")

    imp = sub.add_parser("import-cai", help="convert the original pickled AstroMAE checkpoint to safetensors "
                         "(read with a restricted unpickler; nothing in it is executed)")
    imp.add_argument("checkpoint", help="URL of the original .pt checkpoint (or a .pt state dict)")
    imp.add_argument("--out", required=True, help="URL of the safetensors file to write")
    imp.set_defaults(func=_import_cai)

    train = sub.add_parser("train-demo", help="train the demo weights on synthetic galaxies")
    from .. import training as train_mod  # light: torch is imported lazily inside train()

    train_mod.add_arguments(train)
    train.set_defaults(func=_train_demo)

    info = sub.add_parser("info", help="name, mode, engine, parameters and GFLOP per image of a model")
    info.add_argument("--name", default="astromae-demo",
                      help="model name: astromae-demo (default), astromae, or a plug-in (entry point or "
                           "package.module:factory)")
    info.add_argument("--weights", default=None,
                      help="weights URL (safetensors); default: the model's own (the demo weights for "
                           "astromae-demo)")
    info.add_argument("--mode", default="exact", choices=MODES,
                      help="exact (default, fp32) or fast (the ViT blocks in int8)")
    info.add_argument("--engine", default=None, choices=ENGINES,
                      help="default: $CAI_ENGINE or auto (ONNX Runtime for AstroMAE on CPU)")
    info.set_defaults(func=_info)
    parser.set_defaults(func=lambda args: (parser.print_help(), 2)[1])


def _import_cai(args: argparse.Namespace) -> int:
    from .. import storage
    from ..models.astromae.checkpoint import import_checkpoint

    blob, report = import_checkpoint(storage.read_bytes(args.checkpoint), args.checkpoint)
    storage.write_bytes(args.out, blob)
    print(f"{args.checkpoint}: {report.summary()}")
    print(f"wrote {args.out} ({len(blob) / 1e6:.1f} MB); load it with load_model('astromae', weights='{args.out}')")
    return 0


def _train_demo(args: argparse.Namespace) -> int:
    import sys

    from .. import training as train_mod

    args.command_line = " ".join(["cai", *sys.argv[1:]])
    return train_mod.run(args)


def _info(args: argparse.Namespace) -> int:
    from ..models.astromae.network import flops_per_image
    from ..models.registry import load_model

    pred = load_model(args.name, weights=args.weights, mode=args.mode, engine=args.engine)
    out = {"name": pred.name, "mode": pred.mode, "engine": pred.engine, "device": pred.device,
           "n_params": pred.n_params}
    module = getattr(pred, "module", None)
    if module is not None:
        out["gflop_per_image"] = round(flops_per_image(module) / 1e9, 4)
    print(json.dumps(out, indent=1))
    return 0
