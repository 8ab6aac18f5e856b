"""``crm-assets``: read dataflow documents, serve the embedded CRMs, run the demo.

Each subcommand imports only what it needs: ``spec`` never imports Dagster.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def _spec(args: argparse.Namespace) -> int:
    from crm_assets.engine.document import (
        DocumentError,
        SelectionError,
        read_documents,
        to_json_text,
    )

    try:
        documents = read_documents([Path(f) for f in args.files])
    except (DocumentError, SelectionError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: cannot read {exc.filename}: {exc.strerror}", file=sys.stderr)
        return 2
    for document in documents:
        for warning in document.warnings:
            print(f"warning: {warning.message}", file=sys.stderr)
    print(to_json_text(documents) if args.json else "\n\n".join(d.summary() for d in documents))
    if not args.check:
        return 0
    from crm_assets.connectors import check_document

    errors = [e for d in documents for e in check_document(d)]
    for error in errors:
        print(f"error: {error}", file=sys.stderr)
    return 3 if errors else 0


def _serve(args: argparse.Namespace) -> int:
    from crm_assets.embedded import run_service

    run_service(
        args.system,
        port=args.port,
        data_dir=Path(args.data),
        seed=args.seed,
        rate_limit=args.rate_limit,
        faults=args.faults,
        max_body_bytes=args.max_body_bytes,
    )
    return 0


def _sync(args: argparse.Namespace) -> int:
    from crm_assets.headless import run_sync

    return run_sync(
        flow=args.flow,
        dry_run=args.dry_run,
        full_rescan=args.full_rescan,
        force=args.force,
        rebuild_links=args.rebuild_links,
    )


def _demo(args: argparse.Namespace) -> int:
    from crm_assets.demo import run_demo

    return run_demo(seed=args.seed, port=args.port)


# -- the sync's own records: dead letters and the audit log (no Dagster, but for a retry) --------
class _CliError(Exception):
    """A known failure of a records command: one line on stderr, an exit code."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


def _records_setup(flow: str | None) -> tuple[Any, list[Any]]:
    """The configured state (``None`` before any sync) and the flows asked for."""
    from crm_assets.connectors import UnsupportedFlow
    from crm_assets.engine.document import DocumentError, SelectionError
    from crm_assets.engine.mapping import MappingError
    from crm_assets.engine.state import StateUnavailable, SyncState
    from crm_assets.settings import Settings
    from crm_assets.sync.selection import read_selection

    settings = Settings.from_env()
    try:
        mappings = read_selection(settings.spec_paths, settings.skip_unsupported).mappings
    except (DocumentError, MappingError, SelectionError, UnsupportedFlow) as exc:
        raise _CliError(f"{exc} (fix the document or CRM_SYNC_SPEC)") from None
    except OSError as exc:
        name = exc.filename or "the document"
        raise _CliError(f"cannot read {name}: {exc.strerror} (check CRM_SYNC_SPEC)") from None
    if flow is not None:
        chosen = [m for m in mappings if m.name == flow]
        if not chosen:
            known = ", ".join(m.name for m in mappings)
            raise _CliError(f"no flow {flow!r} (flows: {known})")
        mappings = chosen
    url = settings.state_url
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).exists():
        return None, mappings  # no sync ran with this configuration: nothing recorded yet
    try:
        return SyncState(url, settings.link_copies), mappings
    except StateUnavailable as exc:  # the exit code of crm_assets.headless.EXIT["state"]
        raise _CliError(str(exc), 10) from None


def _print_table(frame: Any, empty: str) -> None:
    """A plain table, columns aligned; long cells cut, but for the last column's."""
    from crm_assets.sync.records import display

    if frame.height == 0:
        print(empty)
        return
    frame = display(frame)
    last = len(frame.columns) - 1

    def cell(value: Any, i: int) -> str:
        text = "" if value is None else " ".join(str(value).split())
        return text if i == last or len(text) <= 60 else text[:59] + "…"

    rows = [list(frame.columns)] + [
        [cell(v, i) for i, v in enumerate(row)] for row in frame.iter_rows()
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(last)]
    for row in rows:
        print("  ".join([*(v.ljust(w) for v, w in zip(row, widths, strict=False)), row[last]]))


def _letter_tables(state: Any, mappings: list[Any]) -> dict[str, Any]:
    from crm_assets.sync.records import dead_letters_table

    if state is None:
        return {}
    return {m.name: dead_letters_table(state, m) for m in mappings}


def _all_letters(tables: dict[str, Any]) -> Any:
    import polars as pl

    frames = [t.select(pl.lit(flow).alias("flow"), pl.all()) for flow, t in tables.items()]
    return pl.concat(frames) if frames else pl.DataFrame({"flow": []})


def _dead_letters_list(args: argparse.Namespace) -> int:
    state, mappings = _records_setup(args.flow)
    letters = _all_letters(_letter_tables(state, mappings))
    _print_table(letters, "no open dead letters")
    return 0


def _chosen_letters(args: argparse.Namespace, state: Any, mappings: list[Any]) -> dict[str, Any]:
    """Per flow, the ids asked for (``None``: all of the flow's), each id checked."""
    if not args.ids and not args.all:
        raise _CliError(f"name the dead letters to {args.action} (ID ...), or give --all")
    tables = _letter_tables(state, mappings)
    if args.all:
        return {flow: None for flow, table in tables.items() if table.height}
    chosen: dict[str, Any] = {}
    unknown = []
    for letter in dict.fromkeys(args.ids):
        owners = [flow for flow, table in tables.items() if letter in table["id"].to_list()]
        if not owners:
            unknown.append(letter)
        elif len(owners) > 1:
            raise _CliError(f"{letter} is open in flows {', '.join(owners)}: choose with --flow")
        else:
            chosen.setdefault(owners[0], []).append(letter)
    if unknown:
        raise _CliError(
            f"no open dead letter {', '.join(unknown)}"
            + (f" in flow {args.flow}" if args.flow else "")
            + " (see `crm-assets dead-letters list`)"
        )
    return chosen


def _dead_letters_act(args: argparse.Namespace) -> int:

    from crm_assets.sync.records import discard_dead_letters, retry_dead_letters

    state, mappings = _records_setup(args.flow)
    chosen = _chosen_letters(args, state, mappings)
    by_name = {m.name: m for m in mappings}
    act = retry_dead_letters if args.action == "retry" else discard_dead_letters
    done = {flow: act(state, by_name[flow], ids) for flow, ids in chosen.items()}
    letters = _all_letters(done)
    if args.action == "discard":
        print(f"discarded {letters.height} dead letter(s):")
        _print_table(letters, "")
        return 0
    if args.no_sync or not letters.height:
        print(f"{letters.height} dead letter(s) will be retried by the next sync:")
        _print_table(letters, "")
        return 0
    from crm_assets.headless import execute_sync

    for m in mappings:  # referenced flows first
        if m.name not in done:
            continue
        print(f"retrying {done[m.name].height} dead letter(s): syncing {m.name}", flush=True)
        outcome = execute_sync(flow=m.name)
        if not outcome.success:
            for failure in outcome.failures[1:]:
                print(f"FAILED {failure}", file=sys.stderr)
            first = outcome.failures[0] if outcome.failures else "see the run log"
            raise _CliError(f"the sync of {m.name} failed: {first}", 1)
    tables = _letter_tables(state, [by_name[f] for f in done])
    still = _all_letters(tables).join(letters.select("flow", "id"), on=["flow", "id"])
    print(f"retried {letters.height} dead letter(s): {letters.height - still.height} cleared")
    if still.height:
        _print_table(still, "")
        raise _CliError(f"{still.height} of {letters.height} still failing (see above)", 1)
    return 0


def _dead_letters(args: argparse.Namespace) -> int:
    run = _dead_letters_list if args.action == "list" else _dead_letters_act
    try:
        return run(args)
    except _CliError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.code
    except LookupError as exc:  # crm_assets.sync.records.UnknownDeadLetter: a race with a run
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _since(text: str) -> Any:
    from datetime import datetime

    try:
        at = datetime.fromisoformat(text)
    except ValueError:
        raise _CliError(f"--since {text!r} is not an ISO time (e.g. 2025-01-31T08:00)") from None
    return at if at.tzinfo else at.astimezone()  # no zone given: the local time


def _audit(args: argparse.Namespace) -> int:
    from crm_assets.sync.records import audit_table

    try:
        since = _since(args.since) if args.since else None
        if args.limit < 1:
            raise _CliError("--limit must be at least 1")
        state, mappings = _records_setup(args.flow)
    except _CliError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.code
    if state is None:
        print("no audit rows (no sync has run with this configuration)")
        return 0
    rows = audit_table(
        state, mappings, args.flow, since, args.record, args.limit, kinds=args.kind or ()
    )
    _print_table(rows, "no audit rows")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="crm-assets", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    spec = sub.add_parser("spec", help="parse dataflow documents and print them")
    spec.add_argument(
        "files",
        nargs="+",
        metavar="file",
        help="Sesam Talk dataflow documents (.rst), or folders of them; with several, flow "
        "names are qualified by their document's file name, as CRM_SYNC_SPEC does",
    )
    spec.add_argument(
        "--json", action="store_true", help="print the parsed document as JSON (several: a list)"
    )
    spec.add_argument(
        "--check",
        action="store_true",
        help="also check every flow has a connector for its systems and objects (exit 3 if not)",
    )
    spec.set_defaults(run=_spec)

    from crm_assets.connectors import CONNECTORS  # light: no FastAPI, no Dagster
    from crm_assets.embedded.middleware import DEFAULT_MAX_BODY_BYTES  # light: stdlib only

    serve = sub.add_parser("serve", help="run one embedded CRM as an HTTP service")
    serve.add_argument("system", choices=[c.slug for c in CONNECTORS])
    serve.add_argument("--port", type=int, required=True)
    serve.add_argument("--data", required=True, help="folder for the service's SQLite file")
    serve.add_argument("--seed", type=int, default=None, help="seed N demo records per object")
    serve.add_argument("--rate-limit", type=float, default=None, help="requests per second")
    serve.add_argument("--faults", action="store_true", help="enable /_admin fault injection")
    serve.add_argument(
        "--max-body-bytes",
        type=int,
        default=DEFAULT_MAX_BODY_BYTES,
        help="request bodies above this are refused 413 (default %(default)s)",
    )
    serve.set_defaults(run=_serve)

    sync = sub.add_parser("sync", help="snapshot, plan and write, in-process, then summarize")
    sync.add_argument("--flow", help="only this flow (e.g. contact_to_contacts); default: all")
    sync.add_argument("--dry-run", action="store_true", help="plan only, write nothing")
    sync.add_argument(
        "--full-rescan", action="store_true", help="re-read everything (finds hard deletes)"
    )
    sync.add_argument("--force", action="store_true", help="write even past the circuit breaker")
    sync.add_argument(
        "--rebuild-links",
        action="store_true",
        help="after a lost state: relink from the CRMs (merge criteria, then records whose "
        "every mapped value agrees); creates and writes nothing",
    )
    sync.set_defaults(run=_sync)

    demo = sub.add_parser("demo", help="every embedded CRM, seeded, plus the Dagster UI")
    demo.add_argument("--seed", type=int, default=500, help="demo records per object")
    demo.add_argument("--port", type=int, default=3000, help="port of the Dagster UI")
    demo.set_defaults(run=_demo)

    letters = sub.add_parser(
        "dead-letters", help="list, retry or discard the sync's per-record failures"
    )
    actions = letters.add_subparsers(dest="action", required=True)
    listing = actions.add_parser("list", help="the open dead letters, with their ids")
    listing.add_argument("--flow", help="only this flow (e.g. product_to_companies)")
    retry = actions.add_parser(
        "retry",
        help="retry dead letters now: attempts start afresh and the flow is synced "
        "(exit 1 if any still fails)",
    )
    discard = actions.add_parser(
        "discard",
        help="forget dead letters (audited; a record still refused is tried again when it "
        "next changes, or by the nightly full plan)",
    )
    for action in (retry, discard):
        action.add_argument("ids", nargs="*", metavar="ID", help="ids as `list` shows them")
        action.add_argument("--flow", help="only dead letters of this flow")
        action.add_argument("--all", action="store_true", help="every open dead letter (of --flow)")
    retry.add_argument(
        "--no-sync", action="store_true", help="only mark them: the next sync retries them"
    )
    letters.set_defaults(run=_dead_letters)

    audit = sub.add_parser(
        "audit", help="the audit log: writes, conflicts (with the losing value), retries, discards"
    )
    audit.add_argument("--flow", help="only this flow (e.g. contact_to_contacts)")
    audit.add_argument(
        "--since", metavar="ISO-TIME", help="only rows at or after this time (no zone: local time)"
    )
    audit.add_argument("--record", metavar="ID", help="only rows about this record (either CRM)")
    audit.add_argument("--kind", action="append", help="only this kind (update, conflict, ...)")
    audit.add_argument(
        "--limit", type=int, default=50, help="the last N rows (default %(default)s)"
    )
    audit.set_defaults(run=_audit)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
