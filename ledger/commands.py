"""``tokenmill streams | usage | invoice | sla | reconcile`` (and the body of
``webhooks``): the stream processors, the reports they feed, and reconciliation.

``streams`` runs a stream processor (``tokenmill up`` starts one as the ``streams`` service).

The reports are a tenant's own, asked of the gateway's account API
(``/v1/tokenmill/…``) with its API key: ``--api-key`` or ``$TOKENMILL_API_KEY`` (on the
local stack, ``--tenant NAME`` stands for that tenant's demo key), at ``--base-url``,
``$TOKENMILL_BASE_URL`` or the local stack's gateway. ``--all-tenants`` is the
operator's command: every tenant's, read from the ledger directly, so it needs the
server's config and database (``settings.ledger_url``: ``TOKENMILL_DATABASE_URL`` or
the SQLite file in the state directory); no tenant key opens it. Both paths make the
same documents (:mod:`.reports`): printed as tables, or as JSON with ``--json``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Annotated, Any, TypeVar
from urllib.parse import quote

import typer
from rich.console import Console
from rich.table import Table
from sqlalchemy.orm import Session
from tokenmill.config import Settings, load_settings
from tokenmill.producers.commands import ApiKeyOpt, BaseUrlOpt, TenantOpt

from tokenmill.errors import StackError, TokenmillError, ValidationError
from tokenmill.stack import ServiceSpec, StopStage, endpoints, register_factory

from .reports import (
    invoice_report,
    parse_period,
    parse_span,
    sla_report,
    this_month,
    usage_report,
    webhooks_report,
)

console = Console()
T = TypeVar("T")

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
AllTenantsOpt = Annotated[
    bool,
    typer.Option(
        "--all-tenants",
        help="Operator: every tenant's, from the ledger directly (needs the server's config).",
    ),
]


@contextmanager
def _ledger(settings: Settings) -> Iterator[Session]:
    from .db import make_engine, migrate, session_factory, transaction

    engine = make_engine(settings.ledger_url)
    try:
        migrate(engine)
        with transaction(session_factory(engine)) as session:
            yield session
    finally:
        engine.dispose()


def _operator(work: Callable[[Session, Settings], T]) -> T:
    """``work`` on the ledger the server's settings name (``--all-tenants``)."""
    settings = load_settings()
    with _ledger(settings) as session:
        return work(session, settings)


def fetch(
    path: str,
    params: Mapping[str, Any],
    *,
    api_key: str | None,
    tenant: str | None,
    base_url: str | None,
) -> Any:
    """One of the caller's reports from the gateway (``GET path?params``).

    Raises:
        ValidationError: no key; or the gateway refused a parameter.
        AuthenticationError: the gateway refused the key.
        StackError: no gateway, or it did not answer.
    """
    import httpx
    from tokenmill.producers.client import connection, error_of

    conn = connection(api_key, base_url=base_url, tenant=tenant)
    if conn.api_key is None:
        raise ValidationError(
            "api_key: give the tenant's API key (--api-key or TOKENMILL_API_KEY); "
            "operators reading the ledger: --all-tenants",
            field="api_key",
        )
    try:
        resp = httpx.get(
            conn.base_url + path,
            params={k: v for k, v in params.items() if v is not None},
            headers={"Authorization": f"Bearer {conn.api_key}"},
            timeout=60.0,
        )
    except httpx.HTTPError as exc:
        raise StackError(f"the gateway at {conn.base_url} did not answer: {exc!r}") from None
    if resp.status_code != 200:
        raise error_of(resp)
    return resp.json()


def _print_json(doc: Any) -> None:
    sys.stdout.write(json.dumps(doc, indent=2) + "\n")


# -- streams -------------------------------------------------------------------------


def streams(
    metrics_port: Annotated[
        int | None,
        typer.Option(
            help="Prometheus endpoint port (0: a free one, written to a file in the home)."
        ),
    ] = None,
    metrics_host: Annotated[str | None, typer.Option(help="Address to serve metrics on.")] = None,
    no_metrics: Annotated[
        bool, typer.Option("--no-metrics", help="No Prometheus endpoint.")
    ] = False,
    app_id: Annotated[str | None, typer.Option(help="Kafka consumer group of the stream processors.")] = None,
) -> None:
    """Run a stream processor: token events → usage, billing and SLA in the ledger."""
    from .streams import StreamsConfig, run

    settings = load_settings()
    overrides: dict[str, Any] = {}
    if metrics_port is not None:
        overrides["metrics_port"] = metrics_port
    if metrics_host is not None:
        overrides["metrics_host"] = metrics_host
    if no_metrics:
        overrides["metrics_port"] = None
    if app_id is not None:
        overrides["app_id"] = app_id
    run(settings, endpoints(settings), StreamsConfig(**overrides))


def streams_services(settings: Settings, models: Sequence[str]) -> list[ServiceSpec]:
    """The ``streams`` service of ``tokenmill up``: ready when its metrics endpoint answers."""
    return [
        ServiceSpec(
            name="streams",
            argv=lambda launch: [
                *(sys.executable, "-m", "tokenmill", "streams"),
                *("--metrics-port", str(launch.port)),
            ],
            address=lambda launch: f"http://127.0.0.1:{launch.port}/metrics",
            probe="http",
            depends_on=("kafka", "redis"),  # redis: the start-up repair reads the result store
            start_timeout_s=60.0,
            stop_stage=StopStage.drain,  # last: consumes every event of finished work first
        )
    ]


# -- usage ---------------------------------------------------------------------------


def usage(
    since: Annotated[str, typer.Option(help="Start: ISO time or a span back (2h, 7d).")] = "24h",
    until: Annotated[str | None, typer.Option(help="End (exclusive); default now.")] = None,
    per_minute: Annotated[
        bool, typer.Option("--per-minute", help="One row per minute window.")
    ] = False,
    api_key: ApiKeyOpt = None,
    tenant: TenantOpt = None,
    base_url: BaseUrlOpt = None,
    all_tenants: AllTenantsOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Your requests and tokens per model (and minute)."""
    if all_tenants:
        start, end = parse_span(since, until)
        doc = _operator(lambda s, _: usage_report(s, start, end, per_minute=per_minute))
    else:
        params = {"since": since, "until": until, "by_minute": per_minute}
        doc = fetch("/v1/tokenmill/usage", params, api_key=api_key, tenant=tenant, base_url=base_url)
    if as_json:
        _print_json(doc)
        return
    rows = doc["rows"]
    if not rows:
        console.print("no usage recorded in that span")
        return
    table = Table(
        title=f"Usage since {doc['since']}" + (f" until {doc['until']}" if doc["until"] else "")
    )
    for col in ("tenant", "model", *(["minute (UTC)"] if per_minute else [])):
        table.add_column(col)
    for col in ("requests", "input tokens", "output tokens"):
        table.add_column(col, justify="right")
    for r in rows:
        minute = [r["minute"][:16].replace("T", " ")] if per_minute else []
        table.add_row(r["tenant"], r["model"], *minute, f"{r['requests']:,}",
                      f"{r['input_tokens']:,}", f"{r['output_tokens']:,}")  # fmt: skip
    console.print(table)


# -- invoice -------------------------------------------------------------------------


def invoice(
    period: Annotated[
        str | None, typer.Option(help="YYYY-MM or YYYY-MM-DD (default: this month, UTC).")
    ] = None,
    api_key: ApiKeyOpt = None,
    tenant: TenantOpt = None,
    base_url: BaseUrlOpt = None,
    all_tenants: AllTenantsOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Your invoice for a month (or a day), one line per model.

    The total is the exact sum of the ledger entries, rounded once (half-even) to the
    currency's minor unit; the rounding adjustment reconciles it with the rounded lines.
    With --all-tenants: one invoice per configured tenant.
    """
    label = period or this_month()
    if all_tenants:
        span = parse_period(label)
        docs = _operator(
            lambda s, settings: [invoice_report(s, t, span) for t in sorted(settings.tenants)]
        )
    else:
        path = f"/v1/tokenmill/invoices/{quote(label, safe='')}"
        docs = [fetch(path, {}, api_key=api_key, tenant=tenant, base_url=base_url)]
    if as_json:
        _print_json(docs if all_tenants else docs[0])
        return
    for doc in docs:
        _invoice_table(doc, label)


def _invoice_table(doc: Mapping[str, Any], label: str) -> None:
    table = Table(title=f"Invoice {doc['tenant']} {label} ({doc['currency']})")
    table.add_column("model")
    table.add_column("kind")  # charge: finished requests; partial: work done on the others
    for col in ("requests", "input tokens", "output tokens", "amount (exact)", doc["currency"]):
        table.add_column(col, justify="right")
    for ln in doc["lines"]:
        table.add_row(ln["model"], ln["kind"], f"{ln['requests']:,}", f"{ln['input_tokens']:,}",
                      f"{ln['output_tokens']:,}", ln["amount"], ln["amount_rounded"])  # fmt: skip
    table.add_section()
    table.add_row("rounding adjustment", "", "", "", "", "", doc["rounding_adjustment"])
    table.add_row("[bold]total[/]", "", "", "", "", doc["total"], f"[bold]{doc['total_rounded']}[/]")
    console.print(table)


# -- sla -----------------------------------------------------------------------------


def sla(
    since: Annotated[str, typer.Option(help="Start: ISO time or a span back (15m, 1h).")] = "1h",
    until: Annotated[str | None, typer.Option(help="End (exclusive); default now.")] = None,
    api_key: ApiKeyOpt = None,
    tenant: TenantOpt = None,
    base_url: BaseUrlOpt = None,
    all_tenants: AllTenantsOpt = False,
    as_json: JsonOpt = False,
    live: Annotated[
        bool,
        typer.Option(
            "--live",
            help="Operator: fair share and SLA per tenant and class, redrawn "
            "over the window --since (a span back) until Ctrl-C or --duration.",
        ),
    ] = False,
    interval: Annotated[
        float, typer.Option(min=0.1, help="--live: seconds between redraws.")
    ] = 2.0,
    duration: Annotated[
        float | None, typer.Option(min=0.0, help="--live: stop after this many seconds.")
    ] = None,
) -> None:
    """Your SLA percentiles per tier and model; attainment and goodput.

    p50/p95/p99 of TTFT, TPOT, end-to-end latency and queue wait over the span, exact
    from the ledger's per-request records. ``--live`` (operator): received vs entitled
    share, Jain's index, largest service gap, queue wait and latency p99, attainment and
    goodput per tenant and priority class, the figures the stream processors export.
    """
    if live:
        _sla_live(since, until, all_tenants=all_tenants, as_json=as_json, interval=interval,
                  duration=duration)  # fmt: skip
        return
    if all_tenants:
        start, end = parse_span(since, until)
        doc = _operator(lambda s, settings: sla_report(s, start, end, targets=settings.sla,
                                                       at_risk=_at_risk_now(settings)))  # fmt: skip
    else:
        params = {"since": since, "until": until}
        doc = fetch("/v1/tokenmill/sla", params, api_key=api_key, tenant=tenant, base_url=base_url)
    if as_json:
        _print_json(doc)
        return
    if not doc["groups"] and not doc["tenants"]:
        console.print("no finished requests in that span")
        return
    table = Table(title=f"SLA since {doc['since']} (ms: p50 / p95 / p99)")
    for col in ("tenant", "tier", "model", "class"):
        table.add_column(col)
    for col in ("requests", "attainment", "TTFT", "TPOT", "end-to-end", "queue"):
        table.add_column(col, justify="right")
    for g in doc["groups"]:
        table.add_row(g["tenant"], g["tier"], g["model"], g.get("priority", "-"), f"{g['requests']:,}",
                      f"{g['attainment']:.1%}",
                      *(_q(g, f) for f in ("ttft_ms", "tpot_ms", "e2e_ms", "queue_ms")))  # fmt: skip
    console.print(table)
    per_tenant = Table(title="Attainment and goodput per tenant")
    per_tenant.add_column("tenant")
    for col in ("requests", "all targets", "TTFT", "TPOT", "end-to-end", "goodput req/s",
                "batches in window", "at risk now"):  # fmt: skip
        per_tenant.add_column(col, justify="right")
    for name, t in doc["tenants"].items():
        ta = t["target_attainment"]
        goodput = "-" if t["goodput_rps"] is None else f"{t['goodput_rps']:.3f}"
        b = t.get("batches") or {}
        windows = f"{b['within_window']}/{b['ended']}" if b.get("ended") else "-"
        per_tenant.add_row(name, f"{t['requests']:,}", _pct(t["attainment"]), _pct(ta["ttft"]),
                           _pct(ta["tpot"]), _pct(ta["e2e"]), goodput, windows,
                           str(b.get("at_risk_now", "-")))  # fmt: skip
    console.print(per_tenant)


def _at_risk_now(settings: Settings) -> dict[str, int] | None:
    """Batches the scheduler forecasts to miss their windows now, per tenant (None: no
    stack to ask)."""
    import redis
    from tokenmill.scheduler.deadlines import FORECASTS_KEY, at_risk_by_tenant

    try:
        client = redis.Redis.from_url(endpoints(settings).redis_url, socket_timeout=2.0,
                                      socket_connect_timeout=2.0)  # fmt: skip
        with client:
            return at_risk_by_tenant(client.hgetall(FORECASTS_KEY))  # type: ignore[arg-type]
    except (TokenmillError, redis.RedisError):
        return None


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _sla_live(since: str, until: str | None, *, all_tenants: bool, as_json: bool,
              interval: float, duration: float | None) -> None:  # fmt: skip
    from .live import ledger_reader, run_live

    if not all_tenants:  # fair shares compare tenants with one another: not a tenant's view
        raise ValidationError("--live reads every tenant's figures from the ledger: "
                              "add --all-tenants (operator)", field="live")  # fmt: skip
    if until is not None or as_json:
        raise ValidationError("--live is a window ending now, drawn as a table: "
                              "no --until, no --json", field="live")  # fmt: skip
    start, _ = parse_span(since, None)
    window_s = (datetime.now(UTC) - start).total_seconds()
    settings = load_settings()
    with ledger_reader(settings, window_s) as read:
        run_live(read, console=console, interval_s=interval, duration_s=duration)


def _q(group: Mapping[str, Any], figure: str) -> str:
    values = (group[f"{figure}_p{p}"] for p in (50, 95, 99))
    return " / ".join("-" if v is None else f"{v:,.0f}" for v in values)


# -- webhooks (the command is ``producers.batch_commands.webhooks_command``) -----------


def webhooks(
    *,
    failed: bool,
    limit: int,
    api_key: str | None,
    tenant: str | None,
    base_url: str | None,
    all_tenants: bool,
    as_json: bool,
) -> None:
    """Webhook deliveries, newest first (``failed``: the dead-lettered ones)."""
    if all_tenants:
        items = _operator(lambda s, _: webhooks_report(s, failed=failed, limit=limit))
    else:
        params = {"failed": failed, "limit": limit}
        page = fetch("/v1/tokenmill/webhooks", params, api_key=api_key, tenant=tenant, base_url=base_url)
        items = page["data"]
    if as_json:
        _print_json(items)
        return
    table = Table(title="dead-lettered webhooks" if failed else "webhooks")
    for col in ("webhook-id", "tenant", "event", "url", "status", "attempts", "last error"):
        table.add_column(col)
    for i in items:
        table.add_row(i["webhook_id"], i["tenant"], i["event_type"], i["url"], i["status"],
                      str(i["attempts"]), i["last_error"] or "")  # fmt: skip
    console.print(table)


# -- migrate ---------------------------------------------------------------------------


def migrate_command() -> None:
    """Operator: upgrade the ledger database (settings.ledger_url:
    TOKENMILL_DATABASE_URL, or the SQLite file in the state directory) to the newest
    schema and exit; already there, it changes nothing. The deployed stack runs it once
    before every other service (docker-compose.yml's ``migrate``)."""
    from tokenmill.errors import LedgerError
    from tokenmill.logs import mask_url

    from .db import make_engine, migrate

    settings = load_settings()
    where = mask_url(settings.ledger_url)
    try:
        engine = make_engine(settings.ledger_url)
    except LedgerError as exc:
        raise LedgerError(f"migrate: the ledger at {where}: {exc}") from None
    try:
        before = _schema_revision(engine)
        migrate(engine)
        after = _schema_revision(engine)
    except LedgerError as exc:
        raise LedgerError(f"migrate: the ledger at {where}: {exc}") from None
    finally:
        engine.dispose()
    if before == after:
        console.print(f"ledger at {where}: already at {after}")
    else:
        console.print(f"ledger at {where}: migrated {before or 'empty'} → {after}")


def _schema_revision(engine: Any) -> str | None:
    """The Alembic revision the database is at (None: no ledger schema yet).

    Raises:
        LedgerError: the database did not answer.
    """
    from alembic.migration import MigrationContext
    from sqlalchemy import exc as sa_exc

    from .errors import translate

    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()  # type: ignore[no-any-return]
    except sa_exc.SQLAlchemyError as exc:
        raise translate(exc, "connect") from exc


# -- reconcile -------------------------------------------------------------------------


def reconcile(
    period: Annotated[
        str | None,
        typer.Option(help="YYYY-MM or YYYY-MM-DD: requests finished then (default: every period)."),
    ] = None,
    tenant: Annotated[str | None, typer.Option(help="Only this tenant's requests.")] = None,
    repair: Annotated[
        bool, typer.Option("--repair", help="Bill what is missing, exactly once (idempotent).")
    ] = False,
    ledger_only: Annotated[
        bool,
        typer.Option("--ledger-only", help="Facts from the ledger's requests alone (no Redis)."),
    ] = False,
    examples: Annotated[int, typer.Option(min=0, help="Request ids shown per category.")] = 10,
    settle_s: Annotated[
        float,
        typer.Option(min=0.0, help="Leave out requests finished less than this many seconds ago."),
    ] = 0.0,
    as_json: JsonOpt = False,
) -> None:
    """Operator: compare the work done (the ledger's requests, the result store) with the
    ledger's charges; print the differences (missing, duplicated, mispriced) and exit 1 on
    any. --repair bills the missing ones first, through the stream processors' write path.

    Reads the server's database (and Redis) like --all-tenants: needs the server's config.
    """
    from tokenmill.logs import configure

    from . import reconcile as rc
    from .db import make_engine, migrate, session_factory
    from .streams import LedgerSink

    settings = load_settings()
    configure(settings.log_level)  # structured logs on stderr: stdout is the report
    span = parse_period(period) if period is not None else None
    results = None if ledger_only else _result_store(settings)
    engine = make_engine(settings.ledger_url)
    try:
        migrate(engine)
        sink = LedgerSink(session_factory(engine), settings)
        sink.prepare()
        with _progress() as progress:
            repaired = None
            if repair:
                _, repaired = rc.repair(sink, results=results, period=span, tenant=tenant,
                                        settle_s=settle_s, progress=progress)  # fmt: skip
            report = rc.reconcile(sink, results=results, period=span, tenant=tenant,
                                  examples=examples, settle_s=settle_s, progress=progress)  # fmt: skip
    finally:
        engine.dispose()
        if results is not None:
            results.close()
    if as_json:
        doc = report.to_dict()
        if repaired is not None:
            doc["repair"] = repaired.to_dict()
        _print_json(doc)
    else:
        _reconcile_tables(report, repaired)
    if not report.clean:
        raise typer.Exit(1)


def _result_store(settings: Settings) -> Any:
    """A client of the result store's Redis, answering (else a StackError naming it)."""
    import redis

    from tokenmill.logs import mask_url

    try:
        url = settings.redis_url or endpoints(settings).redis_url
    except StackError as exc:
        raise StackError(f"{exc} (or reconcile the ledger alone: --ledger-only)") from None
    client = redis.Redis.from_url(url, socket_timeout=60.0, socket_connect_timeout=5.0)
    try:
        client.ping()
    except redis.RedisError as exc:
        client.close()
        raise StackError(
            f"the result store at {mask_url(url)} did not answer ({exc}); "
            "reconcile the ledger alone with --ledger-only"
        ) from None
    return client


@contextmanager
def _progress() -> Iterator[Callable[[str, int, int | None], None]]:
    """A progress callback drawing rich bars on a terminal's stderr (none otherwise)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    err = Console(stderr=True)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=err, transient=True,
                  disable=not err.is_terminal) as bars:  # fmt: skip
        tasks: dict[str, Any] = {}

        def update(stage: str, done: int, total: int | None) -> None:
            if stage not in tasks:
                tasks[stage] = bars.add_task(stage, total=total)
            bars.update(tasks[stage], completed=done, total=total)

        yield update


def _reconcile_tables(report: Any, repaired: Any) -> None:
    scope = f"{report.tenant or 'every tenant'}, " + (
        "every period" if report.period is None
        else f"{report.period.start:%Y-%m-%d} .. {report.period.end:%Y-%m-%d}"
    )  # fmt: skip
    if repaired is not None:
        console.print(
            f"repair: {repaired.missing} missing, {repaired.repaired} billed now, "
            f"{repaired.already} billed meanwhile, {len(repaired.rejected)} refused, "
            f"{len(repaired.unrepairable)} without token counts, {repaired.remaining} left"
        )
        for rid, reason in [*repaired.rejected, *repaired.unrepairable][:10]:
            console.print(f"  {rid}: {reason}")
    table = Table(title=f"Reconciliation ({scope}; {', '.join(report.sources)})")
    table.add_column("difference")
    table.add_column("requests", justify="right")
    table.add_column("first request ids")
    for cat, n in report.counts.items():
        ids = "\n".join(f"{d.request_id} ({d.tenant}): {d.detail}" for d in report.examples[cat])
        table.add_row(cat.value, f"{n:,}", ids)
    console.print(table)
    verdict = "[green]no differences[/]" if report.clean else "[red]differences found[/]"
    console.print(f"{report.facts:,} requests done, {report.charges:,} charges checked "
                  f"in {report.seconds:.2f} s: {verdict}")  # fmt: skip


def register(app: typer.Typer) -> None:
    """Add the ledger's commands to the ``tokenmill`` CLI and the ``streams`` service to
    ``tokenmill up``."""
    app.command("streams")(streams)
    app.command("usage")(usage)
    app.command("invoice")(invoice)
    app.command("sla")(sla)
    app.command("reconcile")(reconcile)
    app.command("migrate")(migrate_command)
    register_factory(streams_services)
