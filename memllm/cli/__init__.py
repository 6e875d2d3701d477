"""The ``memllm`` command line: ``memllm <command> ...``.

Each command lives in a module that exposes ``register(subparsers)``; this file only wires them
together and turns every failure into one line (:mod:`memllm.cli.errors`): a problem the user can
fix (bad input, a file that cannot be read or written) exits 2, a bug in memllm exits 1.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from memllm.cli.errors import report_error

# Modules that add subcommands; each has register(subparsers).
COMMAND_MODULES = [
    "memllm.cli.model",
    "memllm.cli.data",
    "memllm.cli.train",
    "memllm.cli.experiment",
    "memllm.cli.harness",
]


def build_parser() -> argparse.ArgumentParser:
    from memllm.cli.args import OneLineParser

    parser = OneLineParser(
        prog="memllm",
        description="Trainable long-term memory for Hugging Face causal LMs.",
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="debug logging; tracebacks of internal errors"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("transformers", "accelerate", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    try:
        result = args.func(args)
    except KeyboardInterrupt:
        print(f"memllm {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # every failure ends as one line (see memllm.cli.errors)
        return report_error(err, args.command, sys.argv[1:] if argv is None else argv, args.verbose)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
