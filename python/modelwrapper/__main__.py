"""``python -m modelwrapper``: command-line tools for the local shared-memory root."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from . import __version__
from ._gc import collect
from ._root import DEFAULT_ROOT, LOCAL_NAMESPACE, UnsafeRootError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m modelwrapper", description=__doc__)
    ap.add_argument("--version", action="version", version=f"modelwrapper {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)
    gc = sub.add_parser(
        "gc",
        help="free generations that ModelWrapper.from_model() left in shared memory and nothing uses",
        description=(
            f"Frees the generations under <root>/{LOCAL_NAMESPACE} (what ModelWrapper.from_model() published) "
            "that no live process holds a ModelWrapper for and no process maps or holds open, plus what "
            "interrupted from_model() calls left. Prints what it freed and what it kept, and why. "
            "Generations the node agent filled (other namespaces) are never touched: the agent collects them."
        ),
    )
    gc.add_argument("--root", type=Path, default=None, help=f"the local root (default: $MODELWRAPPER_ROOT, else {DEFAULT_ROOT})")
    gc.add_argument("--dry-run", action="store_true", help="only print what would be freed")
    gc.add_argument("--wait", type=float, default=60.0, help="seconds to wait for a from_model() or load() in progress (default 60)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    try:
        report = collect(args.root, dry_run=args.dry_run, timeout=args.wait)
    except UnsafeRootError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for line in report.lines():
        print(line)
    return 1 if report.busy else 0


if __name__ == "__main__":
    raise SystemExit(main())
