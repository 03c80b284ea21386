"""What must hold after a fault drill, checked against what the callers and the receiver
saw and what the ledger holds — every check appends its findings with exact numbers, so
one run says everything that went wrong, not only the first thing.

The oracle is independent of the code under test: prices come from the test config's
card (:data:`fault_stack.PRICES`), signatures are checked with a plain HMAC, the ledger is
read with SQLAlchemy from the stack's SQLite file.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import importlib.util
import json
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import sqlalchemy as sa
from fault_stack import PRICES, FaultStack
from tokenmill.ledger import LedgerEntry, UsageRecord
from webhook_receiver import Receiver
from workload import Batches, Outcome

_MILLION = Decimal(1_000_000)
QUANTUM = Decimal("1e-10")  #: the ledger's unit


@dataclass(frozen=True)
class Success:
    """A request whose answer reached its caller: it must be billed exactly once, to the token."""

    request_id: str
    tenant: str
    batch: bool  #: a batch line (discounted) or an interactive request
    prompt_tokens: int
    completion_tokens: int

    def price(self) -> Decimal:
        factor = Decimal(1) - Decimal(PRICES["batch_discount"]) if self.batch else Decimal(1)
        amount = (
            (
                Decimal(PRICES["input_per_million"]) * self.prompt_tokens
                + Decimal(PRICES["output_per_million"]) * self.completion_tokens
            )
            * factor
            / _MILLION
        )
        return amount.quantize(QUANTUM)


@dataclass
class Findings:
    problems: list[str] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)
    pending: list[str] = field(default_factory=list)  #: checks that cannot run yet, and why

    def check(self, ok: bool, problem: str) -> None:
        if not ok:
            self.problems.append(problem)

    def report(self) -> str:
        lines = [f"- {p}" for p in self.problems]
        lines.append("figures: " + json.dumps(self.figures, sort_keys=True, default=str))
        lines += [f"pending: {p}" for p in self.pending]
        return "\n".join(lines)


def _sample(items: list[Any], n: int = 5) -> str:
    return ", ".join(map(str, items[:n])) + (f" … (+{len(items) - n})" if len(items) > n else "")


# -- batch files ----------------------------------------------------------------------------


def batch_lines_once(
    batches: Batches, files: dict[str, tuple[list[dict], list[dict]]], f: Findings
) -> list[Success]:
    """Every batch ended completed; every line is in its output or error file exactly once.
    Returns the output files' successful lines."""
    successes = []
    statuses = Counter(b.status for b in batches.last.values())
    f.figures["batch_status"] = dict(statuses)
    f.check(
        statuses == Counter({"completed": len(batches.ids)}),
        f"batches ended {dict(statuses)}, not all completed",
    )
    out_lines = err_lines = 0
    for tenant, (output, errors) in files.items():
        out_lines, err_lines = out_lines + len(output), err_lines + len(errors)
        seen = Counter(e["custom_id"] for e in output + errors)
        expected = set(batches.custom_ids[tenant])
        missing = sorted(expected - set(seen), key=lambda c: int(c.rsplit("-", 1)[1]))
        doubled = sorted(c for c, n in seen.items() if n > 1)
        stray = sorted(set(seen) - expected)
        f.check(
            not missing,
            f"{tenant}: {len(missing)} of {len(expected)} lines in neither file: {_sample(missing)}",
        )
        f.check(not doubled, f"{tenant}: {len(doubled)} lines more than once: {_sample(doubled)}")
        f.check(not stray, f"{tenant}: {len(stray)} lines that were never sent: {_sample(stray)}")
        for e in output:
            response = e.get("response") or {}
            usage = (response.get("body") or {}).get("usage") or {}
            if response.get("status_code") != 200 or not usage:
                f.problems.append(
                    f"{tenant}: output line {e['custom_id']} is not a success with usage: {e}"
                )
                continue
            successes.append(
                Success(
                    response["request_id"],
                    tenant,
                    True,
                    int(usage["prompt_tokens"]),
                    int(usage["completion_tokens"]),
                )
            )
    f.figures["output_lines"], f.figures["error_lines"] = out_lines, err_lines
    return successes


# -- interactive requests ---------------------------------------------------------------------


def interactive_outcomes(outcomes: list[Outcome], allowed: set[str], f: Findings) -> list[Success]:
    """Each request ended with one outcome of the allowed kinds (``ok``, and ``clear_error``
    where Redis or the broker was lost). Returns the successes."""
    kinds = Counter(o.kind for o in outcomes)
    f.figures["interactive"] = dict(kinds)
    f.figures["interactive_by_wave"] = {
        w: dict(Counter(o.kind for o in outcomes if o.wave == w))
        for w in sorted({o.wave for o in outcomes})
    }
    bad = [o for o in outcomes if o.kind not in allowed]
    if bad:
        details = Counter(f"{o.kind} ({o.via}): {o.detail[:120]}" for o in bad)
        f.problems.append(
            f"{len(bad)} of {len(outcomes)} interactive requests ended outside {sorted(allowed)}: "
            + "; ".join(f"{n}× {d}" for d, n in details.most_common(4))
        )
    ids = Counter(o.request_id for o in outcomes if o.request_id)
    f.check(all(n == 1 for n in ids.values()), "two interactive requests share a request id")
    late = [o for o in outcomes if o.late_usage]
    if late:
        f.figures["collected_after_an_error"] = len(late)
    return [
        Success(o.request_id, o.tenant, False, *o.usage)
        for o in outcomes
        if o.kind == "ok" and o.request_id and o.usage
    ] + [
        Success(o.request_id, o.tenant, False, *o.late_usage)
        for o in late
        if o.request_id and o.late_usage
    ]


# -- the ledger --------------------------------------------------------------------------------


def _entries(stack: FaultStack, ids: list[str]) -> tuple[dict[str, list[Any]], dict[str, Any]]:
    engine = sa.create_engine(stack.settings().ledger_url)
    entries: dict[str, list[Any]] = defaultdict(list)
    usage: dict[str, Any] = {}
    try:
        with engine.connect() as conn:
            for start in range(0, len(ids), 500):
                chunk = ids[start : start + 500]
                for row in conn.execute(
                    sa.select(LedgerEntry.__table__).where(LedgerEntry.request_id.in_(chunk))
                ):
                    entries[row.request_id].append(row)
                for row in conn.execute(
                    sa.select(UsageRecord.__table__).where(UsageRecord.request_id.in_(chunk))
                ):
                    usage[row.request_id] = row
    finally:
        engine.dispose()
    return entries, usage


def _charges(rows: list[Any]) -> list[Any]:
    return [r for r in rows if str(r.kind) == "charge"]


def ledger_matches(
    stack: FaultStack,
    successes: list[Success],
    unsuccessful: dict[str, str],
    settle_s: float,
    f: Findings,
) -> None:
    """The ledger's charges equal the successes one for one, to the token and to the
    10⁻¹⁰ unit; nothing that did not succeed carries a charge. Waits (bounded) for the
    stream processors to catch up first."""
    ids = [s.request_id for s in successes]
    deadline = time.monotonic() + settle_s
    while True:
        entries, usage = _entries(stack, ids + list(unsuccessful))
        unbilled = [i for i in ids if not _charges(entries.get(i, []))]
        if not unbilled or time.monotonic() >= deadline:
            break
        time.sleep(1.0)
    f.figures["successes"] = len(successes)
    f.figures["unbilled"] = len(unbilled)
    by_source = Counter(
        "batch" if s.batch else "interactive" for s in successes if s.request_id in set(unbilled)
    )
    f.check(
        not unbilled,
        f"{len(unbilled)} of {len(successes)} delivered successes have no charge in the ledger "
        f"after {settle_s:.0f}s ({dict(by_source)}): {_sample(unbilled)}",
    )
    wrong_tokens, wrong_amount, doubled, no_usage = [], [], [], []
    for s in successes:
        charges = _charges(entries.get(s.request_id, []))
        if len(charges) > 1:
            doubled.append(s.request_id)
        if not charges:
            continue
        c = charges[0]
        if (c.prompt_tokens, c.completion_tokens) != (s.prompt_tokens, s.completion_tokens):
            wrong_tokens.append(
                f"{s.request_id}: ledger {c.prompt_tokens}+{c.completion_tokens}, "
                f"answer {s.prompt_tokens}+{s.completion_tokens}"
            )
        if Decimal(c.amount) != s.price():
            wrong_amount.append(f"{s.request_id}: {c.amount} != {s.price()}")
        u = usage.get(s.request_id)
        if u is None or (u.prompt_tokens, u.completion_tokens) != (
            s.prompt_tokens,
            s.completion_tokens,
        ):
            no_usage.append(s.request_id)
    f.check(not doubled, f"{len(doubled)} successes charged more than once: {_sample(doubled)}")
    f.check(
        not wrong_tokens,
        f"{len(wrong_tokens)} charges with other token counts than the answer: "
        f"{_sample(wrong_tokens, 3)}",
    )
    f.check(
        not wrong_amount,
        f"{len(wrong_amount)} charges at another amount than the card's: {_sample(wrong_amount, 3)}",
    )
    f.check(
        not no_usage,
        f"{len(no_usage)} billed successes without a matching usage record: {_sample(no_usage)}",
    )
    charged_failures = [
        f"{i} ({how})" for i, how in unsuccessful.items() if _charges(entries.get(i, []))
    ]
    f.figures["charged_without_success"] = len(charged_failures)
    f.check(
        not charged_failures,
        f"{len(charged_failures)} requests charged in full though no success reached "
        f"their caller or file: {_sample(charged_failures)}",
    )
    other = Counter(
        str(r.kind) for i in unsuccessful for r in entries.get(i, []) if str(r.kind) != "charge"
    )
    f.figures["other_entries_of_unsuccessful"] = dict(other)
    billed = [s for s in successes if _charges(entries.get(s.request_id, []))]
    f.figures["charged_amount"] = str(
        sum((Decimal(_charges(entries[s.request_id])[0].amount) for s in billed), Decimal(0))
    )


# -- webhooks ---------------------------------------------------------------------------------


def _signed(secret: str, post: Any) -> bool:
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = (
        f"{post.headers.get('webhook-id')}.{post.headers.get('webhook-timestamp')}.".encode()
        + post.body
    )
    expected = "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    return any(
        hmac.compare_digest(expected, s) for s in post.headers.get("webhook-signature", "").split()
    )


def webhooks_once(
    stack: FaultStack,
    receiver: Receiver,
    expected: dict[str, str],
    optional: dict[str, str],
    settle_s: float,
    f: Findings,
) -> None:
    """Every expected message (receiver path → tenant) arrived, each as one webhook-id
    (retries of one message keep its id), signed with its tenant's secret; optional ones
    (requests whose caller heard of a lost component) arrived at most once."""
    wait_deadline = time.monotonic() + settle_s
    while any(not receiver.received(p) for p in expected) and time.monotonic() < wait_deadline:
        time.sleep(0.5)
    secrets = {
        t: c.webhook_secret.get_secret_value()
        for t, c in stack.settings().tenants.items()
        if c.webhook_secret
    }
    missing = [p for p in expected if not receiver.received(p)]
    f.check(
        not missing,
        f"{len(missing)} of {len(expected)} webhooks never arrived after {settle_s:.0f}s: "
        f"{_sample(missing)}",
    )
    posts = redelivered = 0
    doubled, unsigned = [], []
    for path, tenant in {**expected, **optional}.items():
        got = receiver.received(path)
        posts += len(got)
        ids = {p.webhook_id for p in got}
        redelivered += len(got) - len(ids)
        if len(ids) > 1:
            doubled.append(f"{path}: {len(ids)} ids")
        unsigned += [path for p in got if not _signed(secrets[tenant], p)]
    f.figures["webhook_posts"], f.figures["webhook_redelivered_same_id"] = posts, redelivered
    f.check(
        not doubled,
        f"{len(doubled)} messages delivered under several webhook-ids: {_sample(doubled)}",
    )
    f.check(
        not unsigned,
        f"{len(unsigned)} webhooks not signed with the tenant's secret: {_sample(unsigned)}",
    )


# -- tokenmill reconcile ----------------------------------------------------------------------

RECONCILE_PENDING = (
    "tokenmill reconcile: ledger/reconcile.py has not landed; zero differences unchecked"
)


@dataclass(frozen=True)
class Reconciliation:
    counts: dict[str, int]  #: category → exact count of differing requests
    examples: dict[str, list[str]]  #: category → some of their request ids
    exit_code: int


def reconcile(stack: FaultStack) -> Reconciliation | str | None:
    """``tokenmill reconcile --json`` over the whole ledger and result store; None while
    the command has not landed, the output when it printed no report."""
    if importlib.util.find_spec("tokenmill.ledger.reconcile") is None:
        return None
    run = stack.cli("reconcile", "--json", timeout_s=300.0)
    try:
        report = json.loads(run.stdout)
        counts = {k: int(v) for k, v in report["counts"].items()}
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        return f"exit {run.returncode}: {run.stdout[-500:]}{run.stderr[-500:]}"
    examples = {
        k: [d["request_id"] for d in v] for k, v in (report.get("examples") or {}).items() if v
    }
    return Reconciliation(counts, examples, run.returncode)


def clean_before(stack: FaultStack) -> Reconciliation | None:
    """The reconciliation a case starts from. A case before may have left differences on
    the shared stack: they are repaired first (``--repair``, as an operator would), so
    every case is judged on its own; what stays is the baseline. (Nothing touches the
    ledger between two cases, so the last case's final reconciliation is reused.)"""
    before = stack.last_reconciliation or reconcile(stack)
    if isinstance(before, Reconciliation) and any(before.counts.values()):
        stack.cli("reconcile", "--repair", "--json", timeout_s=300.0)
        before = reconcile(stack)
    return before if isinstance(before, Reconciliation) else None


def reconcile_zero(stack: FaultStack, before: Reconciliation | None, f: Findings) -> None:
    """``tokenmill reconcile`` finds no difference the case made, by its exact counts (and
    exits 0 when it finds none). Recorded as pending while the command has not landed."""
    after = stack.last_reconciliation = reconcile(stack)
    if after is None:
        f.pending.append(RECONCILE_PENDING)
        return
    if isinstance(after, str):
        f.problems.append(f"tokenmill reconcile --json printed no report: {after}")
        return
    f.figures["reconcile"] = after.counts
    base = before.counts if before else dict.fromkeys(after.counts, 0)
    if any(base.values()):
        f.figures["reconcile_inherited"] = base
    new = {k: n - base.get(k, 0) for k, n in after.counts.items() if n != base.get(k, 0)}
    f.check(bool(after.counts), "tokenmill reconcile --json reported no counts")
    f.check(
        not new,
        f"tokenmill reconcile: differences {new} (before the case {base}); e.g. {after.examples}",
    )
    f.check(
        after.exit_code == 0 or any(after.counts.values()),
        f"tokenmill reconcile exited {after.exit_code} with zero differences",
    )
