"""``medquant``: the command line of the engine tools (also ``python -m engine_tools``).

Each sub-command lives in ``engine_tools/commands/<name>.py`` and defines
``register(subparsers) -> argparse.ArgumentParser`` whose parser sets ``func(args, progress) -> dict``
(the JSON result) and optionally ``render(result) -> str`` (the human-readable result).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TextIO

from engine_tools import __version__
from engine_tools.progress import Cancelled, JsonLinesProgress, Progress, make_progress

COMMANDS = ("models", "fetch", "build", "segment", "compare", "demo")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medquant",
        description="Real INT8 post-training quantization of 3D medical segmentation networks.",
    )
    parser.add_argument("--version", action="version", version=f"medquant {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--progress",
        choices=("human", "jsonl", "none"),
        default="human",
        help="human: progress bar on stderr; jsonl: one JSON event per line on stdout (worker protocol)",
    )
    common.add_argument(
        "--weights-dir", help="offline mirror of model weight files (checked before downloading)"
    )
    common.add_argument(
        "--cache-dir",
        help="cache for weights, exports and engines (default: $MEDQUANT_CACHE_DIR or user cache)",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        module = importlib.import_module(f"engine_tools.commands.{name}")
        module.register(subparsers, common)
    return parser


@contextmanager
def _stdout_reserved_for_protocol() -> Iterator[TextIO]:
    """Yield a stream on the real stdout for the jsonl protocol while everything else written to stdout
    (libraries' progress bars, print calls, native code writing to descriptor 1) goes to stderr."""
    saved_stdout = sys.stdout
    saved_fd = None
    sys.stdout.flush()
    try:
        fd = sys.stdout.fileno()
        saved_fd = os.dup(fd)
        protocol: TextIO = os.fdopen(os.dup(fd), "w", encoding="utf-8", buffering=1)
        os.dup2(sys.stderr.fileno(), fd)
    except (AttributeError, OSError, ValueError):  # stdout without a descriptor (in-process callers)
        protocol = saved_stdout
    sys.stdout = sys.stderr
    try:
        yield protocol
    finally:
        sys.stdout = saved_stdout
        if saved_fd is not None:
            protocol.flush()
            os.dup2(saved_fd, saved_stdout.fileno())
            os.close(saved_fd)
            protocol.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.cache_dir:
        os.environ["MEDQUANT_CACHE_DIR"] = args.cache_dir
    if args.progress == "jsonl":
        with _stdout_reserved_for_protocol() as protocol:
            return _run(args, JsonLinesProgress(protocol))
    return _run(args, make_progress(args.progress))


def _run(args: argparse.Namespace, progress: Progress) -> int:
    try:
        result = args.func(args, progress)
    except (Cancelled, KeyboardInterrupt) as exc:
        progress.error(Cancelled(str(exc) or "cancelled"))
        return 130
    except Exception as exc:  # every failure ends in one readable error event
        progress.error(exc)
        if os.environ.get("MEDQUANT_DEBUG"):
            raise
        return 1
    progress.result(result)
    if args.progress == "human":
        render = getattr(args, "render", None)
        print(render(result) if render else json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
