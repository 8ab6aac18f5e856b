"""``python -m crm_assets.embedded SYSTEM --port P --data DIR [...]``.

``SYSTEM`` is a connector's slug (``SYSTEMS``, from the registry).

The same options as ``crm-assets serve``, usable without the CLI (tests start services so).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from crm_assets.embedded.middleware import DEFAULT_MAX_BODY_BYTES
from crm_assets.embedded.service import SYSTEMS, run_service


def build_parser() -> argparse.ArgumentParser:
    """The ``serve`` arguments, shared in spirit with the CLI."""
    parser = argparse.ArgumentParser(
        prog="python -m crm_assets.embedded", description="Serve an embedded CRM on 127.0.0.1."
    )
    parser.add_argument("system", choices=SYSTEMS)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--data", type=Path, required=True, help="directory of the SQLite file")
    parser.add_argument("--seed", type=int, default=None, help="N demo contacts if empty")
    parser.add_argument("--rate-limit", type=float, default=None, help="requests per second")
    parser.add_argument("--faults", action="store_true", help="enable /_admin fault injection")
    parser.add_argument(
        "--max-body-bytes",
        type=int,
        default=DEFAULT_MAX_BODY_BYTES,
        help="request bodies above this are refused 413 (default %(default)s)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    run_service(
        args.system,
        args.port,
        args.data,
        args.seed,
        args.rate_limit,
        args.faults,
        max_body_bytes=args.max_body_bytes,
    )


if __name__ == "__main__":
    main()
