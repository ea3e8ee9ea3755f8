"""`modelhive` command line: one subcommand per module in this package, imported lazily.

Each subcommand module exposes ``add_arguments(parser)`` and ``run(args) -> int`` (exit code).
User errors (``ModelhiveError``) print one line to stderr and exit 1; no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from modelhive.errors import ModelhiveError

SUBCOMMANDS = {
    "serve": ("modelhive.cli.serve", "serve models over an OpenAI-compatible HTTP API"),
    "plan": ("modelhive.cli.plan", "print the memory plan of a config without loading weights"),
    "ps": ("modelhive.cli.ps", "show loaded models, memory planned vs measured (like `ollama ps`)"),
    "generate": ("modelhive.cli.generate", "generate text offline from the command line"),
    "bench": ("modelhive.cli.bench", "run benchmarks"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="modelhive", description=__doc__.splitlines()[0])
    from modelhive import __version__

    parser.add_argument("--version", action="version", version=f"modelhive {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
            p.set_defaults(_missing=module)
            continue
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "_missing", None):
        print(f"modelhive {args.command}: not available in this build", file=sys.stderr)
        return 2
    try:
        return int(args._run(args) or 0)
    except ModelhiveError as exc:
        print(f"modelhive {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
