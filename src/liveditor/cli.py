"""The `liveditor` command. Thin: each subcommand parses arguments and calls library code.

Each subcommand is one `_add_<name>(subparsers)` function that registers its parser and sets
`handler` to a function of the parsed arguments.
"""

from __future__ import annotations

import argparse
import sys

from .errors import LIVEditorError


def _add_isa_report(subparsers) -> None:
    p = subparsers.add_parser(
        "isa-report",
        help="ISA-vs-dense fidelity on structured video-like inputs",
        description="Run ISA against dense attention on synthetic video in-context attention "
        "inputs and print relative L1/L2 error, cosine similarity and FLOP fraction per config.",
    )
    p.add_argument("--frames", type=int, default=8, help="latent frames per segment")
    p.add_argument("--height", type=int, default=16, help="latent rows per frame")
    p.add_argument("--width", type=int, default=24, help="latent columns per frame")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", dest="json_path", default=None, help="also write the rows as JSON")

    def handler(args):
        from .isa.report import run_fidelity_report

        run_fidelity_report(
            grid=(args.frames, args.height, args.width),
            heads=args.heads,
            head_dim=args.head_dim,
            seed=args.seed,
            device=args.device,
            json_path=args.json_path,
        )

    p.set_defaults(handler=handler)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="liveditor", description="LIVEditor: in-context video editing with sparse attention."
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_isa_report(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.handler(args)
    except (LIVEditorError, ValueError, FileNotFoundError, NotADirectoryError) as exc:
        if args.debug:
            raise
        print(f"liveditor {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"liveditor {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
