"""`medquant models` (placeholder until implemented)."""

from __future__ import annotations

import argparse


def register(
    subparsers: argparse._SubParsersAction, common: argparse.ArgumentParser
) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("models", parents=[common], help="(not implemented yet)")
    parser.set_defaults(func=_run)
    return parser


def _run(args: argparse.Namespace, progress) -> dict:
    raise NotImplementedError("medquant models is not implemented yet")
