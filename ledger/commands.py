"""``tokenmill usage | invoice | sla``: reports from the ledger.

The stream-processor work builds them; until then they say so plainly.
"""

from __future__ import annotations

from typing import Annotated

import typer

from tokenmill.cli import not_built_yet

_ISSUE = "built with the usage, billing and SLA stream processors"


def usage(tenant: Annotated[str | None, typer.Option(help="Only this tenant.")] = None) -> None:
    """Token usage per tenant and model."""
    not_built_yet("usage", _ISSUE)


def invoice(
    tenant: Annotated[str, typer.Argument(help="The tenant to bill.")],
    month: Annotated[str | None, typer.Option(help="YYYY-MM (default: this month).")] = None,
) -> None:
    """A tenant's invoice for a month, exact to the cent."""
    not_built_yet("invoice", _ISSUE)


def sla(tenant: Annotated[str | None, typer.Option(help="Only this tenant.")] = None) -> None:
    """SLA attainment (goodput) per tenant and tier."""
    not_built_yet("sla", _ISSUE)


def register(app: typer.Typer) -> None:
    """Add the ledger's commands to the ``tokenmill`` CLI."""
    app.command("usage")(usage)
    app.command("invoice")(invoice)
    app.command("sla")(sla)
