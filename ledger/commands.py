"""``tokenmill streams | usage | invoice | sla``: the stream processors and the reports
they feed.

``streams`` runs a faust worker (``tokenmill up`` starts one as the ``streams`` service);
the reports read the ledger (``settings.ledger_url``: ``TOKENMILL_DATABASE_URL`` or the
SQLite file in the state directory) and print a table, or JSON with ``--json``.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from sqlalchemy.orm import Session
from tokenmill.config import Settings, load_settings

from tokenmill.errors import ValidationError
from tokenmill.stack import ServiceSpec, endpoints, register_factory

console = Console()

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhdw])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
TenantOpt = Annotated[str | None, typer.Option(help="Only this tenant.")]


def parse_time(text: str, *, now: datetime | None = None) -> datetime:
    """``2026-11-03``, ``2026-11-03T12:00`` (UTC unless it says otherwise), or a span back
    from now: ``90s``, ``15m``, ``2h``, ``7d``, ``1w``.

    Raises:
        ValidationError: none of those.
    """
    now = now or datetime.now(UTC)
    m = _DURATION.match(text.strip())
    if m:
        return now - timedelta(seconds=float(m[1]) * _UNIT_S[m[2]])
    try:
        at = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValidationError(
            f"{text!r} is not a time: give ISO 8601 (2026-11-03T12:00) or a span like 2h, 7d"
        ) from None
    return at if at.tzinfo else at.replace(tzinfo=UTC)


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


def _print_json(doc: Any) -> None:
    sys.stdout.write(json.dumps(doc, indent=2, default=str) + "\n")


def _iso(at: datetime | None) -> str | None:
    return at.isoformat().replace("+00:00", "Z") if at else None


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
    app_id: Annotated[str | None, typer.Option(help="faust app id = Kafka consumer group.")] = None,
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
            depends_on=("kafka",),
            start_timeout_s=60.0,
        )
    ]


# -- usage ---------------------------------------------------------------------------


def usage(
    tenant: TenantOpt = None,
    since: Annotated[str, typer.Option(help="Start: ISO time or a span back (2h, 7d).")] = "24h",
    until: Annotated[str | None, typer.Option(help="End (exclusive); default now.")] = None,
    per_minute: Annotated[
        bool, typer.Option("--per-minute", help="One row per minute window.")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Requests and tokens per tenant and model (and minute), from the ledger."""
    from .usage import usage_rows

    settings = load_settings()
    start, end = parse_time(since), parse_time(until) if until else None
    with _ledger(settings) as session:
        rows = usage_rows(session, start, end, tenant=tenant, per_minute=per_minute)
    if as_json:
        _print_json({
            "since": _iso(start), "until": _iso(end),
            "rows": [{"tenant": r.tenant, "model": r.model, **({"minute": _iso(r.minute)} if per_minute else {}),
                      "requests": r.requests, "input_tokens": r.input_tokens,
                      "output_tokens": r.output_tokens} for r in rows],
        })  # fmt: skip
        return
    table = Table(title=f"Usage since {_iso(start)}" + (f" until {_iso(end)}" if end else ""))
    for col in ("tenant", "model", *(["minute (UTC)"] if per_minute else [])):
        table.add_column(col)
    for col in ("requests", "input tokens", "output tokens"):
        table.add_column(col, justify="right")
    for r in rows:
        minute = [r.minute.strftime("%Y-%m-%d %H:%M")] if per_minute and r.minute else []
        table.add_row(r.tenant, r.model, *minute, f"{r.requests:,}", f"{r.input_tokens:,}",
                      f"{r.output_tokens:,}")  # fmt: skip
    if not rows:
        console.print("no usage recorded in that span")
        return
    console.print(table)


# -- invoice -------------------------------------------------------------------------


def parse_period(text: str | None) -> Any:
    """``YYYY-MM`` (a month) or ``YYYY-MM-DD`` (a day), UTC; None: this month."""
    from .billing import Period

    if text is None:
        today = datetime.now(UTC)
        return Period.month(today.year, today.month)
    try:
        if re.fullmatch(r"\d{4}-\d{2}", text):
            year, month = map(int, text.split("-"))
            return Period.month(year, month)
        return Period.day(date.fromisoformat(text))
    except ValueError:
        raise ValidationError(
            f"period {text!r}: give YYYY-MM or YYYY-MM-DD", field="period"
        ) from None


def invoice(
    tenant: Annotated[str, typer.Option(help="The tenant to bill.")],
    period: Annotated[
        str | None, typer.Option(help="YYYY-MM or YYYY-MM-DD (default: this month).")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """A tenant's invoice for a month (or a day), one line per model.

    The total is the exact sum of the ledger entries, rounded once (half-even) to the
    currency's minor unit; the rounding adjustment reconciles it with the rounded lines.
    """
    from .billing import invoice as make_invoice

    settings = load_settings()
    span = parse_period(period)
    with _ledger(settings) as session:
        inv = make_invoice(session, tenant, span)
    if as_json:
        _print_json({
            "tenant": inv.tenant, "period": {"start": _iso(inv.period.start), "end": _iso(inv.period.end)},
            "currency": inv.currency,
            "lines": [{"model": ln.model, "requests": ln.requests, "input_tokens": ln.prompt_tokens,
                       "output_tokens": ln.completion_tokens, "amount": str(ln.amount),
                       "amount_rounded": str(ln.amount_rounded)} for ln in inv.lines],
            "total": str(inv.total), "total_rounded": str(inv.total_rounded),
            "rounding_adjustment": str(inv.rounding_adjustment),
        })  # fmt: skip
        return
    label = period or inv.period.start.strftime("%Y-%m")
    table = Table(title=f"Invoice {inv.tenant} {label} ({inv.currency})")
    table.add_column("model")
    for col in ("requests", "input tokens", "output tokens", "amount (exact)", inv.currency):
        table.add_column(col, justify="right")
    for ln in inv.lines:
        table.add_row(ln.model, f"{ln.requests:,}", f"{ln.prompt_tokens:,}", f"{ln.completion_tokens:,}",
                      _plain(ln.amount), _plain(ln.amount_rounded))  # fmt: skip
    table.add_section()
    table.add_row("rounding adjustment", "", "", "", "", _plain(inv.rounding_adjustment))
    table.add_row(
        "[bold]total[/]", "", "", "", _plain(inv.total), f"[bold]{_plain(inv.total_rounded)}[/]"
    )
    console.print(table)


def _plain(amount: Decimal) -> str:
    return f"{amount:f}"


# -- sla -----------------------------------------------------------------------------


def sla(
    tenant: TenantOpt = None,
    since: Annotated[str, typer.Option(help="Start: ISO time or a span back (15m, 1h).")] = "1h",
    until: Annotated[str | None, typer.Option(help="End (exclusive); default now.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """SLA percentiles per tenant, tier and model; attainment and goodput per tenant.

    p50/p95/p99 of TTFT, TPOT, end-to-end latency and queue wait over the span, exact
    from the ledger's per-request records.
    """
    from .sla import FIGURES, sla_groups

    settings = load_settings()
    now = datetime.now(UTC)
    start, end = parse_time(since, now=now), parse_time(until, now=now) if until else None
    span_s = ((end or now) - start).total_seconds()
    with _ledger(settings) as session:
        groups = sla_groups(session, start, end, tenant=tenant, targets=settings.sla)
    tenants: dict[str, dict[str, Any]] = {}
    for g in groups:
        t = tenants.setdefault(
            g.tenant, {"requests": 0, "met": 0, "target_met": {"ttft": 0, "tpot": 0, "e2e": 0}}
        )
        t["requests"] += g.requests
        t["met"] += g.met
        for k, v in g.target_met.items():
            t["target_met"][k] += v
    summary = {
        name: {
            "requests": t["requests"], "met": t["met"],
            "attainment": t["met"] / t["requests"] if t["requests"] else None,
            "target_attainment": {k: v / t["requests"] for k, v in t["target_met"].items()},
            "goodput_rps": t["met"] / span_s if span_s > 0 else None,
        }
        for name, t in tenants.items()
    }  # fmt: skip
    if as_json:
        _print_json({
            "since": _iso(start), "until": _iso(end), "tenants": summary,
            "groups": [{"tenant": g.tenant, "tier": g.tier, "model": g.model, "sla_class": g.sla_class,
                        "requests": g.requests, "met": g.met, "attainment": g.attainment,
                        **{f"{fig}_p{int(q * 100)}": g.quantiles[fig][i]
                           for fig in FIGURES for i, q in enumerate((0.5, 0.95, 0.99))}}
                       for g in groups],
        })  # fmt: skip
        return
    if not groups:
        console.print("no finished requests in that span")
        return
    table = Table(title=f"SLA since {_iso(start)} (ms: p50 / p95 / p99)")
    for col in ("tenant", "tier", "model"):
        table.add_column(col)
    for col in ("requests", "attainment", "TTFT", "TPOT", "end-to-end", "queue"):
        table.add_column(col, justify="right")
    for g in groups:
        table.add_row(g.tenant, g.tier, g.model, f"{g.requests:,}", f"{g.attainment:.1%}",
                      *(_q(g.quantiles[f]) for f in ("ttft_ms", "tpot_ms", "e2e_ms", "queue_ms")))  # fmt: skip
    console.print(table)
    per_tenant = Table(title="Attainment and goodput per tenant")
    per_tenant.add_column("tenant")
    for col in ("requests", "all targets", "TTFT", "TPOT", "end-to-end", "goodput req/s"):
        per_tenant.add_column(col, justify="right")
    for name, s in summary.items():
        ta = s["target_attainment"]
        per_tenant.add_row(name, f"{s['requests']:,}", f"{s['attainment']:.1%}", f"{ta['ttft']:.1%}",
                           f"{ta['tpot']:.1%}", f"{ta['e2e']:.1%}", f"{s['goodput_rps']:.3f}")  # fmt: skip
    console.print(per_tenant)


def _q(values: tuple[float | None, ...]) -> str:
    return " / ".join("-" if v is None else f"{v:,.0f}" for v in values)


def register(app: typer.Typer) -> None:
    """Add the ledger's commands to the ``tokenmill`` CLI and the ``streams`` service to
    ``tokenmill up``."""
    app.command("streams")(streams)
    app.command("usage")(usage)
    app.command("invoice")(invoice)
    app.command("sla")(sla)
    register_factory(streams_services)
