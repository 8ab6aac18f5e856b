"""``crm-assets``: read dataflow documents, serve the embedded CRMs, run the demo.

Each subcommand imports only what it needs: ``spec`` never imports Dagster.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _spec(args: argparse.Namespace) -> int:
    from crm_assets.engine.document import DocumentError, read_document, to_json_text

    try:
        document = read_document(args.file)
    except DocumentError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: cannot read {args.file}: {exc.strerror}", file=sys.stderr)
        return 2
    print(to_json_text(document) if args.json else document.summary())
    return 0


def _serve(args: argparse.Namespace) -> int:
    from crm_assets.embedded import run_service

    run_service(
        args.system,
        port=args.port,
        data_dir=Path(args.data),
        seed=args.seed,
        rate_limit=args.rate_limit,
        faults=args.faults,
    )
    return 0


def _sync(args: argparse.Namespace) -> int:
    from crm_assets.headless import run_sync

    return run_sync(
        flow=args.flow, dry_run=args.dry_run, full_rescan=args.full_rescan, force=args.force
    )


def _demo(args: argparse.Namespace) -> int:
    from crm_assets.demo import run_demo

    return run_demo(seed=args.seed, port=args.port)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="crm-assets", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    spec = sub.add_parser("spec", help="parse a dataflow document and print it")
    spec.add_argument("file", help="path of a Sesam Talk dataflow document (.rst)")
    spec.add_argument("--json", action="store_true", help="print the parsed document as JSON")
    spec.set_defaults(run=_spec)

    serve = sub.add_parser("serve", help="run one embedded CRM as an HTTP service")
    serve.add_argument("system", choices=["custom-crm", "crm-office"])
    serve.add_argument("--port", type=int, required=True)
    serve.add_argument("--data", required=True, help="folder for the service's SQLite file")
    serve.add_argument("--seed", type=int, default=None, help="seed N demo records per object")
    serve.add_argument("--rate-limit", type=float, default=None, help="requests per second")
    serve.add_argument("--faults", action="store_true", help="enable /_admin fault injection")
    serve.set_defaults(run=_serve)

    sync = sub.add_parser("sync", help="snapshot, plan and write, in-process, then summarize")
    sync.add_argument("--flow", help="only this flow (e.g. contact_to_contacts); default: all")
    sync.add_argument("--dry-run", action="store_true", help="plan only, write nothing")
    sync.add_argument(
        "--full-rescan", action="store_true", help="re-read everything (finds hard deletes)"
    )
    sync.add_argument("--force", action="store_true", help="write even past the circuit breaker")
    sync.set_defaults(run=_sync)

    demo = sub.add_parser("demo", help="both embedded CRMs, seeded, plus the Dagster UI")
    demo.add_argument("--seed", type=int, default=500, help="demo records per object")
    demo.add_argument("--port", type=int, default=3000, help="port of the Dagster UI")
    demo.set_defaults(run=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
