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
import signal
import sys
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TextIO

from engine_tools import __version__
from engine_tools.machine import avoid_hugepage_compaction_stalls
from engine_tools.progress import Cancelled, JsonLinesProgress, Progress, make_progress
from engine_tools.weights import OFFLINE_ENV

COMMANDS = ("models", "fetch", "build", "segment", "compare", "demo")
NETWORK_NOTE = (
    "Network: nothing is downloaded except by `fetch`, and by `build`/`segment`/`compare`/`demo` when a "
    "model's weights (or the demo's scans) are neither in --weights-dir / $MEDQUANT_WEIGHTS_DIR nor in the "
    f"cache; then from the URLs pinned in the cards, SHA-256 checked. --offline or {OFFLINE_ENV}=1 "
    "forbids every download."
)
#: Exit status of a command-line usage error (argparse's convention).
USAGE_EXIT = 2
#: Exit status of a cancelled run (SIGINT, SIGTERM or a cancel request).
CANCELLED_EXIT = 130


class UsageError(ValueError):
    """The command line itself is wrong (unknown option, bad value, missing argument)."""


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are exceptions, so ``--progress jsonl`` can report them as an
    ``error`` event (sub-command parsers are made of the same class)."""

    def error(self, message: str) -> Any:  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="medquant",
        description="Real INT8 post-training quantization of 3D medical segmentation networks.",
        epilog=NETWORK_NOTE,
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
        "--weights-dir",
        help="offline mirror of weight (and demo data) files, checked before the cache and any download",
    )
    common.add_argument(
        "--offline",
        action="store_true",
        help=f"never touch the network (same as {OFFLINE_ENV}=1): a missing file is an error naming its URL",
    )
    common.add_argument(
        "--cache-dir",
        help="cache for weights, exports and engines (default: $MEDQUANT_CACHE_DIR or user cache)",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        module = importlib.import_module(f"engine_tools.commands.{name}")
        command = module.register(subparsers, common)
        if name != "models":
            command.epilog = NETWORK_NOTE
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


def _wants_jsonl(argv: Sequence[str]) -> bool:
    """Whether the (possibly invalid) command line asks for ``--progress jsonl``."""
    argv = list(argv)
    return "--progress=jsonl" in argv or any(
        a == "--progress" and b == "jsonl" for a, b in zip(argv, argv[1:], strict=False)
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command. As a program (``argv`` None) a signal after the final event is ignored; called
    in-process with ``argv`` the caller's signal handlers come back afterwards."""
    as_program = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as exc:
        if _wants_jsonl(argv):
            JsonLinesProgress(sys.stdout).error(exc)
        else:
            parser.print_usage(sys.stderr)
            print(f"error: {exc}", file=sys.stderr)
        return USAGE_EXIT
    if args.cache_dir:
        os.environ["MEDQUANT_CACHE_DIR"] = args.cache_dir
    avoid_hugepage_compaction_stalls()
    with _offline_while_running(args.offline):
        if args.progress == "jsonl":
            with _stdout_reserved_for_protocol() as protocol:
                return _run(args, JsonLinesProgress(protocol), as_program)
        return _run(args, make_progress(args.progress), as_program)


@contextmanager
def _offline_while_running(offline: bool) -> Iterator[None]:
    """``--offline`` sets ``$MEDQUANT_OFFLINE`` (read by the downloader, inherited by worker processes)
    for this command only, so that an in-process caller's later commands are not affected."""
    previous = os.environ.get(OFFLINE_ENV)
    if offline:
        os.environ[OFFLINE_ENV] = "1"
    try:
        yield
    finally:
        if offline and previous is None:
            os.environ.pop(OFFLINE_ENV, None)
        elif offline:
            os.environ[OFFLINE_ENV] = previous


_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class _Signalled(BaseException):
    """Raised by the signal handler; a ``BaseException`` so that no library's ``except Exception``
    swallows it on its way out (like ``KeyboardInterrupt``)."""


def _raise_cancelled(signum: int, _frame: Any) -> None:
    """Signal handler: the first SIGTERM/SIGINT cancels (cleanup runs); later ones are ignored so that
    the cleanup and the final event are not interrupted."""
    _ignore_signals()
    raise _Signalled(f"cancelled by {signal.Signals(signum).name}")


def _ignore_signals() -> None:
    try:
        for sig in _SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
    except ValueError:  # not the main thread
        pass


@contextmanager
def _signals_cancel(restore: bool) -> Iterator[None]:
    """While the block runs, SIGTERM and SIGINT end the command as cancelled (main thread only);
    afterwards the previous handlers come back when ``restore``, else signals stay ignored."""
    try:
        saved = {sig: signal.signal(sig, _raise_cancelled) for sig in _SIGNALS}
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler if restore else signal.SIG_IGN)


@contextmanager
def _warnings_as_events(progress: Progress) -> Iterator[None]:
    """Python warnings raised by the tools or their libraries (ITK messages, DICOM series choice,
    resampling) become ``log`` warning events instead of stderr text; each distinct message once."""
    seen: set[str] = set()

    def show(message: Any, category: type[Warning], *_args: Any, **_kwargs: Any) -> None:
        text = str(message)
        if text not in seen:
            seen.add(text)
            progress.warning(text if issubclass(category, UserWarning) else f"{category.__name__}: {text}")

    with warnings.catch_warnings():
        warnings.simplefilter("default")
        for noisy in (DeprecationWarning, PendingDeprecationWarning, FutureWarning):
            warnings.simplefilter("ignore", noisy)
        warnings.showwarning = show
        yield


def _run(args: argparse.Namespace, progress: Progress, as_program: bool = False) -> int:
    """Run the command; exactly one final ``result`` or ``error`` event whatever happens (a signal
    arriving after the work is done is ignored)."""
    with _signals_cancel(restore=not as_program):
        try:
            with _warnings_as_events(progress):
                result = args.func(args, progress)
        except (Cancelled, KeyboardInterrupt, _Signalled) as exc:
            _ignore_signals()
            progress.error(Cancelled(str(exc) or "cancelled"))
            return CANCELLED_EXIT
        except Exception as exc:  # every failure ends in one readable error event
            _ignore_signals()
            progress.error(exc)
            if os.environ.get("MEDQUANT_DEBUG"):
                raise
            return 1
        _ignore_signals()
        progress.result(result)
        if args.progress == "human":
            render = getattr(args, "render", None)
            print(render(result) if render else json.dumps(result, indent=2, default=str))
        return 0


if __name__ == "__main__":
    sys.exit(main())
