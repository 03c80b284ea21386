"""``tokenmill submit``: one request through the gateway and the whole pipeline, from the
shell.

Who: ``--api-key`` (default ``$TOKENMILL_API_KEY``), or ``--tenant NAME``, which stands
for that tenant's demo key only while the state directory (``$TOKENMILL_HOME``) has a
local stack running (``tokenmill up``). Where: ``--base-url`` (default
``$TOKENMILL_BASE_URL``, else the local stack's gateway).
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer
from rich.console import Console

from ..wire import ResultStatus

console = Console()

# Not typer envvars: the client reads the environment itself, so that --tenant can win
# over a TOKENMILL_API_KEY that happens to be set.
TenantOpt = Annotated[str | None, typer.Option(
    help="Local stack only: act as this tenant with its demo key (alpha, beta, gamma).")]
ApiKeyOpt = Annotated[str | None, typer.Option(help="The tenant's API key (default: $TOKENMILL_API_KEY).")]
BaseUrlOpt = Annotated[str | None, typer.Option(
    help="The gateway (default: $TOKENMILL_BASE_URL, else the local stack's).")]


def submit_command(
    prompt: Annotated[str, typer.Argument(help="The user message (chat) or prompt (--completion).")],
    model: Annotated[str, typer.Option("--model", "-m", help="A configured model.")] = "sim",
    tenant: TenantOpt = None,
    api_key: ApiKeyOpt = None,
    base_url: BaseUrlOpt = None,
    max_tokens: Annotated[int | None, typer.Option(help="Most tokens to generate.")] = None,
    priority: Annotated[str, typer.Option(help="interactive | standard | batch")] = "interactive",
    temperature: Annotated[float | None, typer.Option(help="Sampling temperature.")] = None,
    completion: Annotated[bool, typer.Option(help="Send a /v1/completions prompt instead of a chat message.")] = False,
    stream: Annotated[bool, typer.Option(help="Print tokens as they are generated.")] = False,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the answer.")] = 600.0,
) -> None:
    """Submit one request and print the answer."""
    from .client import Client

    sampling = {} if temperature is None else {"temperature": temperature}
    content = {"prompt": prompt} if completion else {"messages": [{"role": "user", "content": prompt}]}
    with Client(api_key, base_url=base_url, tenant=tenant) as client:
        handle = client.submit(model, max_tokens=max_tokens, priority=priority, stream=stream, **content, **sampling)
        if stream:
            for delta in client.stream(handle, timeout=timeout):
                sys.stdout.write(delta)
                sys.stdout.flush()
            sys.stdout.write("\n")
        result = client.result(handle, timeout=timeout)
    if result.status is not ResultStatus.succeeded:
        err = result.error.message if result.error else ""
        console.print(f"[red]{result.status.value}[/]: {err}")
        raise typer.Exit(1)
    if not stream:
        body = result.body or {}
        choice = (body.get("choices") or [{}])[0]
        text = choice.get("message", {}).get("content") if "message" in choice else choice.get("text")
        console.print(text or "", markup=False, highlight=False)
    if result.usage:
        console.print(
            f"[dim]{handle.request_id} · {result.usage.prompt_tokens} prompt + "
            f"{result.usage.completion_tokens} completion tokens[/]", highlight=False
        )


def register(app: typer.Typer) -> None:
    app.command("submit")(submit_command)
