"""`session-pipeline`: a thin shell over the library (sqlite-utils style).

Every failure a user can cause (a wrong argument, an unknown processor, an unreadable data
dir, a file that is not a DuckDB database) ends in one line on stderr and a non-zero exit,
never a traceback, and never a write to the state database.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn

from flows.ask import register as register_ask_commands
from flows.report import register as register_report_commands
from flows.retention import register as register_retention_commands
from flows.transfer_cli import register as register_transfer_commands
from processors import registry
from state import config, store
from state.config import ConfigError
from state.db import Database, StateError, connect, describe
from state.migrations import migrate

EXIT_ERROR = 1
EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _paths(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data-dir",
        help=f"session transcripts: <data-dir>/<user>/<session>.jsonl "
        f"(env SESSION_DATA_DIR, default {config.DEFAULT_DATA_DIR})",
    )
    parser.add_argument(
        "--db", help=f"DuckDB state file (env SESSION_PIPELINE_DB, default {config.DEFAULT_DB})"
    )


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _port(text: str) -> int:
    value = _positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="session-pipeline",
        description="Turn Claude Code session transcripts into DuckDB tables.",
    )
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = commands.add_parser("run", help="run a processor (or all) now and print its figures")
    run.add_argument("processor", nargs="?", help="processor name (see `processors`)")
    run.add_argument("--all", action="store_true", help="run every enabled processor")
    run.add_argument(
        "--max-attempts",
        type=_positive_int,
        help="failures before a session is quarantined "
        "(env SESSION_PIPELINE_MAX_ATTEMPTS, default 5)",
    )
    run.add_argument(
        "--time-budget",
        type=_positive_int,
        metavar="SECONDS",
        help="stop starting new sessions after this long; the rest wait for the next run",
    )
    run.add_argument("--json", action="store_true", help="print the figures as JSON")
    _paths(run)

    status = commands.add_parser("status", help="per processor: known, processed, failed, …")
    status.add_argument("--json", action="store_true", help="print as JSON")
    _paths(status)

    reprocess = commands.add_parser("reprocess", help="mark sessions to be read again next run")
    reprocess.add_argument("processor")
    reprocess.add_argument("--user", help="only this user's sessions")
    reprocess.add_argument("--session", help="only this session key, e.g. alice/abc.jsonl")
    reprocess.add_argument(
        "--quarantined", action="store_true", help="only quarantined sessions (releases them)"
    )
    _paths(reprocess)

    processors = commands.add_parser("processors", help="registered processors and their state")
    processors.add_argument("--json", action="store_true", help="print as JSON")
    _paths(processors)

    forget = commands.add_parser(
        "forget", help="delete the rows and state of sessions whose file is gone (`missing`)"
    )
    forget.add_argument("processor", nargs="?", help="processor name (default: every one)")
    forget.add_argument("--session", help="only this session key, e.g. alice/abc.jsonl")
    _paths(forget)

    migrate_cmd = commands.add_parser("migrate", help="create or upgrade the state database")
    _paths(migrate_cmd)

    serve = commands.add_parser(
        "serve", help="one machine: Prefect server + UI, scheduled deployments and the webhook"
    )
    serve.add_argument(
        "--ui-host", default=None, help="default $PREFECT_SERVER_API_HOST or 127.0.0.1"
    )
    serve.add_argument(
        "--ui-port", type=_port, default=None, help="default $PREFECT_SERVER_API_PORT or 4200"
    )
    serve.add_argument("--webhook-host", default=None, help="default 127.0.0.1")
    serve.add_argument("--webhook-port", type=_port, default=None, help="default 8787")
    _paths(serve)

    webhook = commands.add_parser("webhook", help="only the webhook (triggers and health)")
    webhook.add_argument("--host", default=None, help="default 127.0.0.1")
    webhook.add_argument("--port", type=_port, default=None, help="default 8787")
    _paths(webhook)

    doctor = commands.add_parser(
        "doctor", help="crash runs whose process is gone, free concurrency slots nobody holds"
    )
    doctor.add_argument("--report-only", action="store_true", help="only say what is wrong")
    _paths(doctor)

    query = commands.add_parser("query", help="run a read-only SQL query on the state database")
    query.add_argument("sql", help='e.g. "SELECT tool_name, count(*) FROM usage_events GROUP BY 1"')
    query.add_argument("--json", action="store_true", help="print rows as JSON objects")
    _paths(query)
    COMMANDS.update(register_report_commands(commands))
    COMMANDS.update(register_ask_commands(commands))
    COMMANDS.update(register_retention_commands(commands))
    COMMANDS.update(register_transfer_commands(commands))
    return parser


def _table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    cells = [[str(c) for c in header], *[["" if c is None else str(c) for c in r] for r in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in lines)


def _when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S %Z").strip() if value else "never"


def _run_locally(
    name: str, data_dir: Path, db: Database, args: argparse.Namespace
) -> dict[str, Any]:
    """A run in this process: the same steps, ledger row and figures as a flow run, without
    a Prefect server (and without importing Prefect)."""
    import logging

    from flows.pipeline import run_direct
    from flows.progress import terminal_sink

    if not logging.getLogger().handlers:  # failed sessions and warnings, one line each
        logging.basicConfig(level=logging.WARNING, format="%(message)s")
    figures = run_direct(
        registry.get(name),
        data_dir,
        db,
        max_attempts=config.max_attempts(args.max_attempts),
        time_budget_seconds=args.time_budget,
        progress=[] if args.json else [terminal_sink()],
    )
    return figures.as_dict()


def cmd_run(args: argparse.Namespace) -> int:
    from flows.pipeline import check_data_dir, check_run_settings
    from flows.prefect_target import prefect_api_url

    if args.all == bool(args.processor):
        raise _UsageError("give a processor name or --all, not both or neither")
    data_dir, db = config.data_dir(args.data_dir), config.db_path(args.db)
    check_run_settings(args.max_attempts)  # every setting, before any work
    if args.all:
        entries = registry.entries()
        names = [e.name for e in entries if e.enabled]
        for e in entries:
            if not e.enabled:
                print(f"{e.name}: skipped: {e.problem or 'disabled'}", file=sys.stderr)
    else:
        names = [registry.get(args.processor).name]
    check_data_dir(data_dir)
    api_url = prefect_api_url(db)
    results = []
    if api_url is None:
        for name in names:
            results.append(_run_locally(name, data_dir, db, args))
        print(
            "ran in this process (no Prefect server: PREFECT_API_URL is unset and no "
            "`session-pipeline serve` runs for this state); `session-pipeline serve` gives "
            "the UI, schedules and the webhook",
            file=sys.stderr,
        )
    else:
        with connect(db) as con:  # fails fast, before Prefect is imported, on a bad or busy db
            migrate(con)
        from flows.processor_flow import run

        os.environ["PREFECT_API_URL"] = api_url  # (found from a local `serve`, perhaps)
        for name in names:
            results.append(
                run(
                    name,
                    data_dir,
                    db,
                    max_attempts=args.max_attempts,
                    time_budget_seconds=args.time_budget,
                )
            )
    if args.json:
        print(json.dumps(results if args.all else results[0], indent=2))
        return 0
    header = ["processor", "scanned", "processed", "skipped", "errors", "quarantined", "held"]
    header += ["items"]
    names = {"items": "items_extracted", "held": "quarantined_held"}
    rows = [[r[names.get(k, k)] for k in header] for r in results]
    print(_table(rows, header))
    for r in results:
        for detail in r["errors_detail"][:20]:
            print(f"  {r['processor']}: {detail['session']}: {detail['error']}")
        if r.get("totals"):
            from flows.summary import totals_line

            print(totals_line(r["processor"], r["totals"]))
    print(f"\nstate: {describe(db)}")
    return 0


def _existing_db(flag: str | None) -> Database:
    """The state database of a command that only reads or changes existing state: a path
    with nothing there is an error (most likely a typo), never a new empty database."""
    db = config.db_path(flag)
    if not db.exists():
        raise StateError(
            f"no state yet at {db}: nothing has run there (`session-pipeline run --all` "
            "creates it; or pass --db / SESSION_PIPELINE_DB)"
        )
    return db


def cmd_status(args: argparse.Namespace) -> int:
    db = _existing_db(args.db)
    names = [e.name for e in registry.entries()]
    with connect(db) as con:
        migrate(con)
        rows = store.status(con, names)
    if args.json:
        print(json.dumps([r.__dict__ for r in rows], default=str, indent=2))
        return 0
    header = ["processor", "known", "processed", "failed", "quarantined", "missing", "last run"]
    print(
        _table(
            [
                [
                    r.processor,
                    r.known,
                    r.processed,
                    r.failed,
                    r.quarantined,
                    r.missing,
                    _when(r.last_run_at)
                    + (
                        f" ({r.last_run_status})"
                        if r.last_run_status not in (None, "completed")
                        else ""
                    ),
                ]
                for r in rows
            ],
            header,
        )
    )
    return 0


def cmd_reprocess(args: argparse.Namespace) -> int:
    names = {e.name for e in registry.entries()}
    if args.processor not in names:
        raise registry.UnknownProcessorError(
            f"Unknown processor '{args.processor}'. Known: {', '.join(sorted(names)) or 'none'}"
        )
    with connect(_existing_db(args.db)) as con:
        migrate(con)
        count = store.release(
            con,
            args.processor,
            user=args.user,
            session=args.session,
            quarantined_only=args.quarantined,
        )
    print(f"{count} session(s) of {args.processor} will be reprocessed on its next run")
    return 0


def cmd_processors(args: argparse.Namespace) -> int:
    found = registry.entries()
    if args.json:
        print(
            json.dumps(
                [
                    {
                        "name": e.name,
                        "version": e.processor.version if e.processor else None,
                        "cadence_seconds": e.processor.cadence_seconds if e.processor else None,
                        "enabled": e.enabled,
                        "reason": e.problem,
                    }
                    for e in found
                ],
                indent=2,
            )
        )
        return 0
    rows = [
        [
            e.name,
            e.processor.version if e.processor else "",
            f"{e.processor.cadence_seconds}s" if e.processor else "",
            "enabled" if e.enabled else f"disabled: {e.problem}",
        ]
        for e in found
    ]
    print(_table(rows, ["processor", "version", "cadence", "state"]))
    return 0


def cmd_forget(args: argparse.Namespace) -> int:
    # Disabled processors too: their missing sessions are as gone as anyone's.
    processors = [
        e.processor
        for e in registry.entries()
        if e.processor is not None and args.processor in (None, e.name)
    ]
    if not processors:
        registry.get(str(args.processor))  # says it is unknown, in the usual words
    with connect(_existing_db(args.db)) as con:
        migrate(con)
        for processor in processors:
            from flows import request_copies

            gone = store.forget_missing(
                con,
                processor,
                [args.session] if args.session else None,
                request_copies.forget_hooks() if processor.name == "usage" else None,
            )
            print(f"{processor.name}: forgot {len(gone)} missing session(s)")
            for key in gone[:20]:
                print(f"  {key}")
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    db = config.db_path(args.db)
    with connect(db) as con:
        ran = migrate(con)
    print(f"{describe(db)}: " + ("applied " + "; ".join(ran) if ran else "up to date"))
    return 0


def _webhook_address(host: str | None, port: int | None) -> tuple[str, int]:
    from flows.webhook import DEFAULT_HOST, DEFAULT_PORT

    host = host or os.environ.get("SESSION_PIPELINE_WEBHOOK_HOST") or DEFAULT_HOST
    if port is None:
        port = config.positive_int("SESSION_PIPELINE_WEBHOOK_PORT", DEFAULT_PORT)
    return host, port


def cmd_serve(args: argparse.Namespace) -> int:
    from flows.serve import serve

    host, port = _webhook_address(args.webhook_host, args.webhook_port)
    return serve(
        args.data_dir,
        args.db,
        ui_host=args.ui_host,
        ui_port=args.ui_port,
        webhook_host=host,
        webhook_port=port,
    )


def cmd_webhook(args: argparse.Namespace) -> int:
    from flows.webhook import main as webhook_main

    host, port = _webhook_address(args.host, args.port)
    argv = ["--host", host, "--port", str(port)]
    for flag, value in (("--data-dir", args.data_dir), ("--db", args.db)):
        if value:
            argv += [flag, value]
    return webhook_main(argv)


def cmd_doctor(args: argparse.Namespace) -> int:
    from flows.doctor import doctor

    # PREFECT_API_URL, else the `serve` running for this state database (flows/serve.py)
    report = doctor(config.db_path(args.db), fix=not args.report_only)
    for line in report.lines() or ["no zombie runs, no leaked concurrency slots"]:
        print(line)
    return 0 if report.clean or not args.report_only else 3


def cmd_query(args: argparse.Namespace) -> int:
    from state.db import DATABASE_ERRORS

    with connect(_existing_db(args.db), read_only=True) as con:
        try:
            cursor = con.execute(args.sql)
        except DATABASE_ERRORS as error:
            raise _QueryError(str(error).splitlines()[0]) from None
        header = [d[0] for d in cursor.description or []]
        rows = cursor.fetchall()
    if args.json:
        print(json.dumps([dict(zip(header, r, strict=True)) for r in rows], default=str, indent=2))
    elif header:
        print(_table(rows, header))
    return 0


class _QueryError(Exception):
    pass


class _UsageError(Exception):
    pass


COMMANDS = {
    "run": cmd_run,
    "status": cmd_status,
    "reprocess": cmd_reprocess,
    "processors": cmd_processors,
    "forget": cmd_forget,
    "migrate": cmd_migrate,
    "query": cmd_query,
    "serve": cmd_serve,
    "webhook": cmd_webhook,
    "doctor": cmd_doctor,
}


# Errors a user can cause that modules imported only by some commands raise: looked up only if
# their module was imported (it must have been, to raise them), so `status`, `query` and
# `processors` never import Prefect (about a second).
_LAZY_ERRORS = (("flows.processor_flow", "RunRefused"), ("flows.prefect_api", "PrefectUnavailable"))


def _expected(error: Exception) -> bool:
    kinds: list[type[BaseException]] = [
        ConfigError,
        StateError,
        registry.UnknownProcessorError,
        _QueryError,
    ]
    for module, name in _LAZY_ERRORS:
        if module in sys.modules:
            kinds.append(getattr(sys.modules[module], name))
    return isinstance(error, tuple(kinds))


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except _UsageError as error:
        print(f"{parser.prog} {args.command}: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as error:
        if not _expected(error):
            raise
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
