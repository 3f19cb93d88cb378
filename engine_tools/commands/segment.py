"""`medquant segment MODEL --input IMG --output OUT`: label a volume with an engine of one precision."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from engine_tools.commands._options import add_engine_arguments, below_target, engine_spec, require_input
from engine_tools.commands.segment_batch import add_batch_arguments, is_batch, render_batch, run_batch_command
from engine_tools.progress import Progress


def register(
    subparsers: argparse._SubParsersAction, common: argparse.ArgumentParser
) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "segment",
        parents=[common],
        help="segment a volume; writes a labelmap in the input geometry and its label table",
        description="Segment one volume (NIfTI, NRRD, MHA, MGZ or a DICOM folder) with MODEL, or with "
        "--output-dir every scan of a folder or list (resumable; Dask with --scheduler/--cluster).",
    )
    parser.add_argument("model", metavar="MODEL", help="model id (see `medquant models`) or a card .json")
    parser.add_argument(
        "--input",
        "-i",
        required=True,
        help="volume file or DICOM series folder (with --output-dir: a folder of scans or a .txt/.csv list)",
    )
    parser.add_argument("--output", "-o", help="labelmap to write (.nii.gz, .nii, .nrrd, .mha)")
    add_engine_arguments(parser)
    parser.add_argument("--overlap", type=float, default=None, help="sliding-window overlap (card default)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    parser.add_argument(
        "--sliding-windows",
        action="store_true",
        help="run overlapping windows even where the card's network is fully convolutional "
        "(default there: one pass over the head's bounding box)",
    )
    add_batch_arguments(parser)
    parser.set_defaults(func=run, render=render)
    return parser


def run(args: argparse.Namespace, progress: Progress) -> dict[str, Any]:
    if is_batch(args):
        return run_batch_command(args, progress)
    from engine_tools.checks import check_output_path
    from engine_tools.segment import label_table_paths

    output = Path(args.output)
    table_path, csv_path = label_table_paths(output)
    if not args.overwrite:  # refuse before any expensive work; write_segmentation checks again
        for path in (output, table_path, csv_path):
            if path.exists():
                raise FileExistsError(f"{path} exists; pass --overwrite to replace it")
    input_path = require_input(args.input)
    inputs = [input_path, *(folder for folder in (args.calibration, args.validation) if folder)]
    check_output_path(output, inputs, args.overwrite)

    from engine_tools.label_stats import label_volumes
    from engine_tools.pipeline import prepare_engine
    from engine_tools.registry import get_card
    from engine_tools.segment import segment_image, write_segmentation
    from engine_tools.volumes import read_image

    card = get_card(args.model)
    started = time.perf_counter()
    image = read_image(input_path)
    spec = engine_spec(args, card, progress)
    with progress.span(0.2, 0.5):
        engine = prepare_engine(card, spec, progress)
    prepared = time.perf_counter()
    with progress.span(0.5, 0.95):
        result = segment_image(
            engine,
            card,
            image,
            progress=progress,
            overlap=args.overlap,
            whole_volume=False if args.sliding_windows else None,
        )
    segmented = time.perf_counter()
    progress.update("write", 0.97, f"writing {output}")
    written = write_segmentation(result, output, overwrite=args.overwrite)
    timings = dict(getattr(result, "timings", None) or {})
    timings.update(
        prepare_engine_s=round(prepared - started, 3),
        segment_s=round(segmented - prepared, 3),
        end_to_end_s=round(time.perf_counter() - started, 3),
    )
    return {
        "output": str(output),
        "label_table": str(written["label_table_json"]),
        "label_table_csv": str(written["label_table_csv"]),
        "timings": timings,
        "engine": engine.describe(),
        "below_target": below_target(engine.describe()),
        "model": card.id,
        "input": str(input_path),
        "volumes": label_volumes(result.labels, label_table=result.label_table),  # mL and voxels per label
    }


def render(result: dict[str, Any]) -> str:
    if "manifest" in result:
        return render_batch(result)
    engine = result["engine"]
    kept = engine.get("kept_in_higher_precision")
    lines = [
        f"labels:      {result['output']}",
        f"label table: {result['label_table']}",
        f"engine:      {engine.get('backend')} {engine.get('precision')} on {engine.get('device')}, "
        f"{engine.get('bytes_on_disk', 0) / 2**20:.2f} MiB ({engine.get('cache', 'built')})",
        "timings:     "
        + ", ".join(
            f"{k} {v:.2f}s"
            for k, v in result["timings"].items()
            if k.endswith("_s") and isinstance(v, float | int)
        ),
    ]
    if kept:
        lines.append(f"INT8 layers kept in higher precision: {', '.join(map(str, kept))}")
    return "\n".join(lines)
