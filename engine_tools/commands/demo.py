"""`medquant demo` (placeholder until implemented)."""

from __future__ import annotations

import argparse


def register(
    subparsers: argparse._SubParsersAction, common: argparse.ArgumentParser
) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("demo", parents=[common], help="(not implemented yet)")
    parser.set_defaults(func=_run)
    return parser


def _run(args: argparse.Namespace, progress) -> dict:
    raise NotImplementedError("medquant demo is not implemented yet")
