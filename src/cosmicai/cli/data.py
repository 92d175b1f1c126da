"""``cai data``: make, convert, re-partition, describe and check datasets (see docs/data.md)."""

from __future__ import annotations

import argparse
import json
import os

SIZE_HELP = ("target partition size, e.g. 10MB, 25MB, 100MB (MB = 2**20 bytes; rows = floor(size / 20,508), "
             "which gives the original CAI's 5,113 rows per 100MB); default %(default)s")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--endpoint", metavar="URL", help="S3 endpoint for s3:// URLs (default: $CAI_S3_ENDPOINT, "
                   "$AWS_ENDPOINT_URL_S3, $AWS_ENDPOINT_URL, else AWS)")


def _writer_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, metavar="URL", help="output dataset folder (path or s3://bucket/prefix)")
    p.add_argument("--partition-size", default="25MB", metavar="SIZE", help=SIZE_HELP)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--replace", action="store_true",
                   help="replace a dataset already at --out (removes only its manifest, the partitions it lists and "
                   "its source record); without it such a dataset is refused, unless this write resumes it (same "
                   "source, same options)")
    _common(p)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``cai data synth|convert|split|info|verify``."""
    data = subparsers.add_parser("data", help="make, convert, split, describe and verify datasets",
                                 description="Datasets of 5-band 32x32 galaxy cutouts in the native partition "
                                 "format (safetensors + manifest.json).")
    sub = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)

    p = sub.add_parser("synth", help="render synthetic SDSS-like galaxies into a native dataset")
    p.add_argument("--galaxies", type=int, required=True, metavar="N", help="number of galaxies")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--workers", type=int, default=None, metavar="W", help="render processes (default: all cores)")
    _writer_options(p)
    p.set_defaults(func=cmd_synth)

    for name, text in (("convert", "convert FITS, HDF5, npz/npy, legacy .pt or native data into a native dataset"),
                       ("split", "re-partition any readable dataset or file into partitions of a target size")):
        p = sub.add_parser(name, help=text, description=text + ". Formats: see docs/data.md.")
        p.add_argument("src", metavar="SRC", help="source file or folder (path or s3://bucket/prefix)")
        _writer_options(p)
        p.add_argument("--drop-nonfinite", action="store_true",
                       help="drop rows with NaN/inf (and report how many) instead of stopping with an error")
        if name == "convert":
            p.add_argument("--catalog", metavar="CAT",
                           help="catalogue (CSV, Parquet or FITS table) of the per-galaxy cutouts in the folder SRC "
                           "(.npy or FITS files of [5, 32, 32]): magnitudes (u g r i z, mag_u..mag_z or "
                           "'magnitudes'), an id column (object_id, objid or id), optional redshift and file; rows "
                           "join cutouts by 'file' or by id = file name without suffix")
            p.add_argument("--columns", metavar="A,B,...",
                           help="numeric catalogue columns to carry into the partitions and predictions, e.g. "
                           "ra,dec,specobjid (with --catalog)")
            p.add_argument("--id-column", metavar="NAME",
                           help="catalogue column holding the object ids (default: object_id, objid or id)")
        p.set_defaults(func=cmd_split)

    p = sub.add_parser("info", help="summarise a dataset (partitions, rows, bytes, redshift)")
    p.add_argument("url", metavar="URL", help="dataset folder (path or s3://bucket/prefix)")
    p.add_argument("--json", action="store_true", help="print JSON")
    _common(p)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("verify", help="check every partition's checksum, shape, dtype and finiteness")
    p.add_argument("url", metavar="URL", help="dataset folder (path or s3://bucket/prefix)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _common(p)
    p.set_defaults(func=cmd_verify)


def _apply_endpoint(args: argparse.Namespace) -> None:
    if getattr(args, "endpoint", None):
        os.environ["CAI_S3_ENDPOINT"] = args.endpoint


def cmd_synth(args: argparse.Namespace) -> int:
    from ..errors import ConfigError
    from ..data.split import synth_dataset

    _apply_endpoint(args)
    if args.galaxies < 1:
        raise ConfigError(f"--galaxies must be >= 1, got {args.galaxies}")
    report = synth_dataset(args.galaxies, args.out, seed=args.seed, partition_size=args.partition_size,
                           workers=args.workers, progress=not args.quiet, replace=args.replace)
    print("\n".join(report.lines()))
    return 0


def cmd_split(args: argparse.Namespace) -> int:
    from ..data.split import split
    from ..errors import ConfigError

    _apply_endpoint(args)
    catalog = getattr(args, "catalog", None)
    if catalog is None and (getattr(args, "columns", None) or getattr(args, "id_column", None)):
        raise ConfigError("--columns and --id-column go with --catalog (a folder of cutouts and its catalogue)")
    if catalog is not None:
        from ..data.cutouts import convert_cutouts

        columns = [c.strip() for c in (args.columns or "").split(",") if c.strip()]
        report = convert_cutouts(args.src, catalog, args.out, columns=columns, id_column=args.id_column,
                                 partition_size=args.partition_size, drop_nonfinite=args.drop_nonfinite,
                                 progress=not args.quiet, replace=args.replace)
        print("\n".join(report.lines()))
        return 0
    report = split(args.src, args.out, partition_size=args.partition_size, drop_nonfinite=args.drop_nonfinite,
                   progress=not args.quiet, replace=args.replace)
    print("\n".join(report.lines()))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from ..data.verify import dataset_info

    _apply_endpoint(args)
    info = dataset_info(args.url)
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    rows = "unknown (no manifest.json)" if info["rows"] is None else f"{info['rows']:,}"
    print(f"dataset     {info['url']}")
    print(f"partitions  {info['partitions']:,} ({info['first']} ... {info['last']})")
    print(f"rows        {rows}")
    if info["rows"] is not None:
        print(f"per part    {info['rows_per_partition_min']:,} - {info['rows_per_partition_max']:,} rows")
    print(f"bytes       {info['bytes']:,} ({info['bytes'] / 1e6:.1f} MB)")
    if info["manifest"]:
        print(f"redshift    {'yes' if info['has_redshift'] else 'no'}")
        print(f"format      v{info['format_version']}, bands {info['bands']}, image {info['image_shape']}")
        if info.get("columns"):
            print(f"columns     {', '.join(info['columns'])} (carried from the catalogue)")
        if info["description"]:
            print(f"about       {info['description']}")
    else:
        print(f"formats     {', '.join(info['formats'])} (no manifest.json)")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    import sys

    from ..data.verify import verify_dataset

    _apply_endpoint(args)
    report = verify_dataset(args.url, progress=not args.quiet)
    how = "size, sha256, " if report.has_manifest else "(no manifest: checksums not checked) "
    if report.ok:
        print(f"ok: {report.checked} partition(s), {report.rows:,} rows; checked {how}shape, dtype, finiteness")
        return 0
    for name, problem in report.problems.items():
        print(f"BAD {name}: {problem}", file=sys.stderr)
    print(f"{len(report.problems)} of {report.checked} partition(s) bad: {', '.join(report.problems)}",
          file=sys.stderr)
    return 1
