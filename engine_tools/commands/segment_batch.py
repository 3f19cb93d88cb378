"""`medquant segment MODEL --input FOLDER_OR_LIST --output-dir OUT`: a cohort with one engine.

Dispatched from :mod:`engine_tools.commands.segment` when ``--output-dir`` is given. The engine is built
or loaded once (here, on the client) and every scan is segmented into ``OUT`` with its manifest and
``volumes.csv`` (see :mod:`engine_tools.batch_run`); ``--scheduler``/``--cluster`` run the scans on Dask.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from engine_tools.commands._options import engine_spec
from engine_tools.progress import Progress


def add_batch_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("cohorts (a folder or list of scans)")
    group.add_argument(
        "--output-dir",
        metavar="OUT",
        help="segment every scan of --input (a folder searched recursively, or a .txt/.csv list of paths) "
        "into OUT/<scan>.nii.gz with OUT/manifest.csv|json and OUT/volumes.csv; re-running resumes",
    )
    group.add_argument(
        "--reference",
        metavar="PATTERN",
        help="reference labelmaps for Dice in volumes.csv, e.g. 'labels/{stem}_dseg.nii.gz' "
        "({stem}: file name without ending, {scan}: relative path without ending, {parent}: its folder; "
        "relative to the input folder)",
    )
    where = group.add_mutually_exclusive_group()
    where.add_argument("--scheduler", metavar="ADDRESS", help="run the scans on this Dask scheduler")
    where.add_argument(
        "--cluster", metavar="local:N", help="run the scans on a Dask LocalCluster of N worker processes"
    )


def is_batch(args: argparse.Namespace) -> bool:
    """Batch mode: ``--output-dir`` given (``--output`` is for one volume)."""
    if args.output_dir and args.output:
        raise ValueError("give --output (one volume) or --output-dir (a folder or list of scans), not both")
    if not args.output_dir and not args.output:
        raise ValueError("--output is required (or --output-dir for a folder or list of scans)")
    if not args.output_dir and (args.scheduler or args.cluster or args.reference):
        raise ValueError("--scheduler, --cluster and --reference need --output-dir (batch mode)")
    return bool(args.output_dir)


def run_batch_command(args: argparse.Namespace, progress: Progress) -> dict[str, Any]:
    from engine_tools.batch import collect_scans, engine_ref
    from engine_tools.batch_run import run_batch
    from engine_tools.checks import check_writable_folder
    from engine_tools.pipeline import prepare_engine
    from engine_tools.registry import ModelCard, get_card

    source, output_dir = Path(args.input), Path(args.output_dir)
    check_writable_folder(output_dir)  # before any work
    if args.cluster:
        from engine_tools.cluster import parse_local

        parse_local(args.cluster)  # a typo fails before the engine is built
    if args.reference:
        try:
            args.reference.format(stem="", scan="", parent="")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(
                f"--reference {args.reference!r}: unknown placeholder {exc}; use {{stem}}, {{scan}} or {{parent}}"
            ) from exc
    scans, found_warnings = collect_scans(source, output_dir)
    for warning in found_warnings:
        progress.warning(warning)
    card = get_card(args.model)
    spec = engine_spec(args, card, progress)
    with progress.span(0.2, 0.3):
        engine = prepare_engine(card, spec, progress)
    if args.overlap is not None:  # a segmentation setting: the engine (and its key) stay the same
        if not 0.0 <= args.overlap < 1.0:
            raise ValueError(f"--overlap must be in [0, 1), got {args.overlap}")
        raw = {**card.raw, "window": {**card.raw["window"], "overlap": args.overlap}}
        card = ModelCard.from_dict(raw, card.path)
    ref = engine_ref(engine, card, args.weights_dir, args.random_weights)
    options = dict(
        input_root=source if source.is_dir() else None,
        reference=args.reference,
        overwrite=args.overwrite,
        sliding_windows=args.sliding_windows,
    )
    with progress.span(0.3, 1.0):
        if args.scheduler or args.cluster:
            from engine_tools.cluster import dask_client

            with dask_client(args.scheduler, args.cluster) as (client, cores):
                progress.log(
                    f"Dask: {len(client.scheduler_info()['workers'])} workers at {client.scheduler.address}"
                )
                result = run_batch(
                    engine,
                    card,
                    ref,
                    scans,
                    output_dir,
                    progress,
                    client=client,
                    cores_per_worker=cores,
                    **options,
                )
        else:
            result = run_batch(engine, card, ref, scans, output_dir, progress, **options)
    result.update(model=card.id, engine=engine.describe(), input=str(source))
    return result


def render_batch(result: dict[str, Any]) -> str:
    counts = result["counts"]
    engine = result["engine"]
    lines = [
        f"scans:     {result['scans']} ({counts['done']} done, {counts['skipped']} skipped, "
        f"{counts['failed']} failed) with {engine.get('backend')} {engine.get('precision')} "
        f"[{result['engine_key'][:12]}] on {result['executor']}",
        f"manifest:  {result['manifest_csv']}",
        f"volumes:   {result['volumes']}",
    ]
    if result["timings"].get("scans_per_hour"):
        lines.append(f"speed:     {result['timings']['scans_per_hour']:.1f} scans/hour")
    lines += [f"failed:    {f['scan']}: {f['error']}" for f in result["failed"]]
    return "\n".join(lines)
