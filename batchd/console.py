"""The operator console at /ui and the API reference at /docs.

Server-rendered pages over the same tokens as the API. A browser logs in
with a token once; the session cookie then holds an expiry and an HMAC of it
keyed with that token, so the server keeps no session state, any replica
accepts the cookie, and rotating the token ends its sessions. A request may
also send ``Authorization: Bearer`` as the API does.

Every form carries a CSRF token, an HMAC of the session keyed with the same
token, so a form from another site (or one without the field) is refused;
the cookie is also ``SameSite=Strict`` and ``HttpOnly``. Pages send a strict
Content-Security-Policy: no script at all on /ui, and on /docs only the
vendored Swagger UI files served from here.

Scope: a named client's token sees and acts on its own rows only; a token
with no client name (and no-token mode, loopback only) is an admin and sees
every client. The SQL lives in batchd/store/console.py; the HTML in
batchd/console_views.py.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web
from sqlalchemy.ext.asyncio import AsyncEngine

from batchd import console_views as v
from batchd import logs
from batchd.clients import Client, Clients
from batchd.errors import BatchdError
from batchd.replay import Replayer, export_line
from batchd.report import Reporter
from batchd.store import console as sql
from batchd.store.spend import day_spend
from batchd.web import bearer_token

log = logs.get("batchd.console")

STATIC = Path(__file__).parent / "static"
SESSION_COOKIE = "batchd_session"
LOGIN_COOKIE = "batchd_login"
SESSION_SECONDS = 12 * 3600
PAGE_SIZE = 50
# Bounds of what one page or one action reads or changes.
QUEUE_COUNT_CAP = 100_000
MANUAL_COUNT_CAP = 10_000
MAX_ACTION_TASKS = 1000

CSP_CONSOLE = (
    "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'"
)
# Swagger UI sets style attributes as it renders and draws its icons from
# data: URIs; scripts still come only from this server.
CSP_DOCS = (
    "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; font-src 'self' data:; connect-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)

_STATIC_FILES = {
    "console.css": "text/css",
    "favicon.svg": "image/svg+xml",
    "docs.js": "text/javascript",
    "docs.css": "text/css",
    "swagger-ui/swagger-ui-bundle.js": "text/javascript",
    "swagger-ui/swagger-ui.css": "text/css",
    "swagger-ui/LICENSE": "text/plain",
    "swagger-ui/NOTICE": "text/plain",
    "swagger-ui/swagger-ui-bundle.js.LICENSE.txt": "text/plain",
}
ALERT_MARK = " \u2014 ALERT"
_DAY = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
_FILTER_TEXT = re.compile(r"[^\x00-\x1f]{1,200}")


@dataclass(frozen=True, slots=True)
class ConsoleConfig:
    window_seconds: float
    max_batch_items: int
    daily_budget_usd: Decimal | None
    alert_ratio: float
    completion_hours: float = 24.0


@dataclass(slots=True)
class Console:
    engine: AsyncEngine
    clients: Clients
    replayer: Replayer
    reporter: Reporter
    config: ConsoleConfig
    # Keys sessions in no-token mode (loopback only), and nothing else.
    local_key: bytes
    jobs: bool = False


CONSOLE = web.AppKey("console", Console)


@dataclass(frozen=True, slots=True)
class Viewer:
    """Who is looking: a name for the page and the audit, the client scope
    (None: every client), and the key their CSRF tokens are made with."""

    name: str
    client: str | None
    key: bytes
    session: str

    @property
    def admin(self) -> bool:
        return self.client is None

    @property
    def csrf(self) -> str:
        return _mac(self.key, "csrf", self.session)


def _mac(key: bytes, purpose: str, message: str) -> str:
    digest = hmac.new(key, f"batchd-ui-{purpose}|{message}".encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


def _scope(client: Client | None) -> tuple[str, str | None]:
    """(name shown, client scope) of a token's client."""
    if client is None:
        return "admin", None
    if client.admin:
        return client.name, None
    return client.name, client.name


def _keys(console: Console) -> list[tuple[bytes, Client | None]]:
    # A plain token's client is ``local`` (not admin), as in the API; no
    # token at all (loopback only) is the operator's, who sees every client.
    if console.clients.required:
        return console.clients.keys()
    return [(console.local_key, None)]


def _session_viewer(console: Console, cookie: str) -> Viewer | None:
    expiry, _, mac = cookie.partition(".")
    if not expiry.isdigit() or not mac:
        return None
    left = int(expiry) - time.time()
    if not 0 < left <= SESSION_SECONDS + 60:
        return None
    found: Viewer | None = None
    for key, client in _keys(console):
        # Every key is tried, each in constant time, so timing says nothing.
        if hmac.compare_digest(_mac(key, "session", expiry), mac) and found is None:
            name, scope = _scope(client)
            if not console.clients.required:
                name = "local"
            found = Viewer(name, scope, key, cookie)
    return found


def viewer_of(request: web.Request) -> Viewer | None:
    console = request.app[CONSOLE]
    token = bearer_token(request.headers)
    if token and console.clients.required:
        client = console.clients.authenticate(token)
        if client is None:
            return None
        name, scope = _scope(client)
        return Viewer(name, scope, token.encode(), "bearer")
    cookie = request.cookies.get(SESSION_COOKIE)
    return _session_viewer(console, cookie) if cookie else None


def new_session(key: bytes) -> str:
    expiry = str(int(time.time()) + SESSION_SECONDS)
    return f"{expiry}.{_mac(key, 'session', expiry)}"


def _set_cookie(
    request: web.Request, response: web.StreamResponse, name: str, value: str, max_age: int
) -> None:
    response.set_cookie(
        name,
        value,
        max_age=max_age,
        path="/ui",
        httponly=True,
        samesite="Strict",
        secure=request.secure,
    )


def secure(response: web.StreamResponse, csp: str = CSP_CONSOLE) -> web.StreamResponse:
    response.headers["Content-Security-Policy"] = csp
    response.headers["X-Content-Type-Options"] = "nosniff"
    # same-origin, not no-referrer: with no-referrer a browser sends "Origin: null"
    # on our own forms, and the origin check below needs the real one.
    response.headers["Referrer-Policy"] = "same-origin"
    response.headers["X-Frame-Options"] = "DENY"
    response.headers.setdefault("Cache-Control", "no-store")
    return response


def html(body: str, status: int = 200) -> web.Response:
    return web.Response(text=body, status=status, content_type="text/html", charset="utf-8")


def see_other(location: str) -> web.Response:
    return web.Response(status=303, headers={"Location": location})


def refusal(status: int, title: str, message: str, viewer: Viewer | None = None) -> web.Response:
    return html(
        v.frame(
            title,
            f'<p class="error">{v.e(message)}</p><p><a href="/ui">Back to the overview</a></p>',
            viewer=viewer.name if viewer else None,
        ),
        status,
    )


PageHandler = Callable[[web.Request, Viewer], Awaitable[web.StreamResponse]]


def page(handler: PageHandler) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """Who is asking (or off to the login page), and for a POST the CSRF
    check, before the handler; security headers on every answer."""

    async def wrapped(request: web.Request) -> web.StreamResponse:
        console = request.app[CONSOLE]
        viewer = viewer_of(request)
        fresh_cookie = None
        if viewer is None and not console.clients.required and request.method == "GET":
            # No tokens (loopback only): every local caller is the admin; the
            # session exists so that forms have something to bind CSRF to.
            fresh_cookie = new_session(console.local_key)
            viewer = Viewer("local", None, console.local_key, fresh_cookie)
        if viewer is None:
            if request.method == "GET":
                target = v.url("/ui/login", next=request.path_qs)
                return secure(see_other(target.replace("&amp;", "&")))
            return secure(
                refusal(401, "Log in first", "this form needs a console session; log in again")
            )
        if request.method == "POST":
            form = await request.post()
            given = form.get("csrf")
            if (
                not isinstance(given, str)
                or not hmac.compare_digest(given, viewer.csrf)
                or not _same_origin(request)
            ):
                log.warning("console.csrf_refused", path=request.path, viewer=viewer.name)
                return secure(
                    refusal(
                        403,
                        "Form refused",
                        "the form's CSRF token is missing or stale; reload the "
                        "page and submit it again",
                        viewer,
                    )
                )
        response = await handler(request, viewer)
        if response.prepared:
            return response  # streamed: its handler sent the headers already
        if fresh_cookie is not None:
            _set_cookie(request, response, SESSION_COOKIE, fresh_cookie, SESSION_SECONDS)
        return secure(response)

    return wrapped


def _same_origin(request: web.Request) -> bool:
    """A browser names the page a POST comes from; it must be this server."""
    origin = request.headers.get("Origin")
    if origin is None:
        return True
    return origin.split("://", 1)[-1] == request.host


# ---------------------------------------------------------------------- login


async def login_form(request: web.Request) -> web.StreamResponse:
    nonce = secrets.token_urlsafe(24)
    response = html(_login_page(nonce, request.query.get("next", "/ui"), ""))
    _set_cookie(request, response, LOGIN_COOKIE, nonce, 1800)
    return secure(response)


def _login_page(nonce: str, target: str, problem: str) -> str:
    note = f'<p class="error">{v.e(problem)}</p>' if problem else ""
    return v.frame(
        "Log in",
        f"""{note}
<form method="post" action="/ui/login" class="login">
{v.csrf_field(nonce)}<input type="hidden" name="next" value="{v.e(target)}">
<label>Bearer token <input type="password" name="token" autocomplete="current-password"
 required autofocus></label>
<button type="submit">Log in</button></form>
<p class="hint">Use a token from BATCHD_INGEST_TOKENS: a client's token shows that client's
tasks; a token without a client name shows every client.</p>""",
    )


def _safe_next(target: str) -> str:
    """Only a console path: never another site, never a scheme-relative URL."""
    if target.startswith("/ui") and not target.startswith("//") and "\\" not in target:
        return target
    return "/ui"


async def login(request: web.Request) -> web.StreamResponse:
    console = request.app[CONSOLE]
    form = await request.post()
    nonce = request.cookies.get(LOGIN_COOKIE, "")
    given = form.get("csrf")
    target = _safe_next(str(form.get("next") or "/ui"))
    if not nonce or not isinstance(given, str) or not hmac.compare_digest(given, nonce):
        log.warning("console.csrf_refused", path=request.path)
        return secure(
            refusal(403, "Form refused", "the login form is stale; open the login page again")
        )
    token = form.get("token")
    client: Client | None = None
    if not console.clients.required:
        key = console.local_key
    else:
        client = console.clients.authenticate(token) if isinstance(token, str) else None
        if client is None:
            log.info("console.login_refused")
            fresh = secrets.token_urlsafe(24)
            response = html(_login_page(fresh, target, "that token is not valid"), 401)
            _set_cookie(request, response, LOGIN_COOKIE, fresh, 1800)
            return secure(response)
        key = str(token).encode()
    name, _ = _scope(client)
    log.info("console.login", viewer=name)
    response = see_other(target)
    _set_cookie(request, response, SESSION_COOKIE, new_session(key), SESSION_SECONDS)
    response.del_cookie(LOGIN_COOKIE, path="/ui")
    return secure(response)


@page
async def logout(request: web.Request, viewer: Viewer) -> web.StreamResponse:
    response = see_other("/ui/login")
    response.del_cookie(SESSION_COOKIE, path="/ui")
    log.info("console.logout", viewer=viewer.name)
    return response


# ------------------------------------------------------------------- overview


def _today(console: Console) -> date:
    return console.reporter.clock().date()


@page
async def overview(request: web.Request, viewer: Viewer) -> web.StreamResponse:
    console = request.app[CONSOLE]
    cfg = console.config
    today = _today(console)
    async with console.engine.connect() as conn:
        windows = await sql.queue_windows(conn, viewer.client, QUEUE_COUNT_CAP)
        sync_q = await sql.sync_queue(conn, viewer.client, QUEUE_COUNT_CAP)
        batches = await sql.live_batches(conn, viewer.client, 100)
        by_client = await sql.spend_by_client(conn, viewer.client, today)
        spent = await day_spend(conn, today) if viewer.admin else None
    report = await console.reporter.day(today) if viewer.admin else None

    def count(n: int) -> str:
        return f"{n:,}+" if n >= QUEUE_COUNT_CAP else f"{n:,}"

    rows = []
    for w in windows:
        now: datetime = w["now"]
        age = (now - w["oldest"]).total_seconds()
        if w["due"] >= cfg.max_batch_items:
            flush = "now (full)"
        elif w["due"] == 0:
            flush = "after backoff"
        else:
            wait = cfg.window_seconds - age
            flush = "now" if wait <= 0 else f"in {v.duration(wait)}"
        rows.append(
            [
                v.e(w["provider"]),
                v.e(w["endpoint"]),
                v.e(w["model"]),
                f'<span class="n">{count(w["n"])}</span>',
                v.e(count(w["due"])),
                v.e(v.duration(age)),
                v.e(flush),
            ]
        )
    queue = v.table(
        ["provider", "endpoint", "model", "queued", "may join now", "oldest", "flushes"],
        rows,
        cls="windows",
        empty="no task is queued for a batch",
    )
    sync_line = (
        f'<p>Synchronous lane: <span class="n" id="sync-queued">'
        f"{count(int(sync_q['n']))}</span> queued"
    )
    if sync_q["oldest"] is not None:
        sync_line += f", oldest since {v.e(sync_q['oldest'])}"
    sync_line += ".</p>"

    brow = []
    for b in batches:
        now = b["now"]
        started = b["submitted_at"] or b["created_at"]
        age = (now - started).total_seconds()
        left = cfg.completion_hours * 3600 - age if b["submitted_at"] else None
        counts = b["request_counts"] or {}
        total = int(counts.get("total") or b["item_count"] or 0)
        done = int(counts.get("completed") or 0) + int(counts.get("failed") or 0)
        pct = done / total if total else 0.0
        late = " late" if left is not None and left < 3600 else ""
        brow.append(
            [
                f'<a href="{v.url("/ui/batch", id=b["id"])}">{v.e(b["id"])}</a>',
                v.e(b["provider_batch_id"]),
                v.e(b["model"]),
                v.e(b["state"]),
                v.e(b["provider_status"]),
                v.e(b["flush_reason"]),
                f"{v.e(v.duration(age))} of {v.e(int(cfg.completion_hours))} h"
                f'<span class="expiry{late}"> ({_expiry(left)})</span>',
                f'<meter min="0" max="1" value="{pct:.3f}"></meter> {done:,}/{total:,}',
            ]
        )
    in_flight = v.table(
        [
            "batch",
            "provider batch",
            "model",
            "state",
            "provider status",
            "flush",
            "age (of expiry)",
            "progress",
        ],
        brow,
        cls="batches",
        empty="no batch is in flight",
    )

    money_parts = []
    if spent is not None:
        budget = cfg.daily_budget_usd
        line = (
            "<p>Spent and reserved today (UTC): "
            f'<span class="n" id="spend-today">{v.money(spent)}</span>'
        )
        if budget is not None:
            share = float(spent / budget) if budget else 1.0
            line += (
                f" of the {v.money(budget)} daily budget "
                f'<meter min="0" max="1" high="0.9" value="{min(share, 1):.3f}"></meter>'
            )
        else:
            line += " (no daily budget set)"
        money_parts.append(line + ".</p>")
    money_parts.append(
        v.table(
            ["client", "results today", "spend today"],
            [
                [
                    v.e(r["client"] or "(anonymous)"),
                    v.e(f"{r['results']:,}"),
                    v.money(r["spend_usd"]),
                ]
                for r in by_client
            ],
            cls="spend",
            empty="no result stored today",
        )
    )

    health = ""
    if report is not None:
        alert = report["alert"]
        health = (
            f'<p class="{"alert" if alert else "ok"}">Failure ratio today: '
            f'<span class="n" id="failure-ratio">{v.percent(report["failure_ratio"])}'
            f"</span> against the ALERT line at {v.percent(cfg.alert_ratio)}"
            f"{ALERT_MARK if alert else ''} ({report['failed']:,} failed, "
            f'{report["succeeded"]:,} succeeded; <span id="manual-queue">'
            f"{report['manual_queue']:,}</span> in the "
            f'<a href="/ui/failed">manual queue</a>).</p>'
        )
    body = (
        f"{health}<h2>Queue by window</h2>{queue}{sync_line}"
        f"<h2>Batches in flight</h2>{in_flight}<h2>Money today</h2>{''.join(money_parts)}"
    )
    return html(
        v.frame(
            "Overview", body, viewer=viewer.name, csrf=viewer.csrf, active="/ui", jobs=console.jobs
        )
    )


def _expiry(left: float | None) -> str:
    return "not yet at the provider" if left is None else f"expires in {v.duration(left)}"


@page
async def batch_page(request: web.Request, viewer: Viewer) -> web.StreamResponse:
    console = request.app[CONSOLE]
    batch_id = request.query.get("id", "")
    if not _FILTER_TEXT.fullmatch(batch_id):
        return refusal(404, "No such batch", "no batch with that id", viewer)
    async with console.engine.connect() as conn:
        found = await sql.batch_detail(conn, viewer.client, batch_id)
    if found is None:
        return refusal(404, "No such batch", "no batch with that id", viewer)
    body = v.pairs(
        [
            (k, v.json_block(val) if isinstance(val, dict | list) else v.e(val))
            for k, val in found.items()
        ]
    )
    return html(
        v.frame(f"Batch {batch_id}", body, viewer=viewer.name, csrf=viewer.csrf, jobs=console.jobs)
    )


# --------------------------------------------------------------------- report


def _client_report_note() -> str:
    return (
        '<p class="hint">The daily report counts every client\'s tasks, so it is shown to '
        "admin tokens only; your own tasks are on the other pages.</p>"
    )


@page
async def report(request: web.Request, viewer: Viewer) -> web.StreamResponse:
    console = request.app[CONSOLE]
    if not viewer.admin:
        return html(
            v.frame(
                "Report",
                _client_report_note(),
                viewer=viewer.name,
                csrf=viewer.csrf,
                active="/ui/report",
                jobs=console.jobs,
            )
        )
    rows = await console.reporter.daily(_today(console), 30)
    labels = [r["date"] for r in rows]
    charts = [
        v.line_chart(
            "Spend vs synchronous price (USD)",
            labels,
            [
                ("spend", [float(r["spend_usd"]) for r in rows]),
                ("sync price", [float(r["sync_equivalent_usd"]) for r in rows]),
            ],
            fmt="$",
        ),
        v.bar_chart(
            "Savings (USD)",
            labels,
            [("saved", [max(float(r["savings_usd"]), 0.0) for r in rows])],
            fmt="$",
        ),
        v.line_chart(
            "Failure ratio",
            labels,
            [("failure ratio", [r["failure_ratio"] * 100 for r in rows])],
            fmt="{:.1f}%",
            threshold=(console.config.alert_ratio * 100, f"ALERT {console.config.alert_ratio:.0%}"),
        ),
        v.bar_chart(
            "Tasks finished per lane",
            labels,
            [
                ("batch", [r.get("lanes", {}).get("batch", {}).get("finished", 0) for r in rows]),
                ("sync", [r.get("lanes", {}).get("sync", {}).get("finished", 0) for r in rows]),
            ],
        ),
    ]
    table = v.table(
        [
            "date",
            "in",
            "ok",
            "failed",
            "retried",
            "replayed",
            "fail %",
            "manual",
            "spend",
            "sync price",
            "saved",
            "",
        ],
        [
            [
                f'<a href="/ui/report/{v.e(r["date"])}">{v.e(r["date"])}</a>',
                v.e(r["tasks_in"]),
                v.e(r["succeeded"]),
                v.e(r["failed"]),
                v.e(r["retried"]),
                v.e(r["replayed"]),
                v.e(v.percent(r["failure_ratio"])),
                v.e(r["manual_queue"]),
                v.money(r["spend_usd"]),
                v.money(r["sync_equivalent_usd"]),
                v.money(r["savings_usd"]),
                '<span class="alert">ALERT</span>' if r["alert"] else "",
            ]
            for r in reversed(rows)
        ],
        cls="report",
    )
    body = (
        f"<p>The last 30 UTC days, today last; the same numbers as "
        f"<code>GET /v1/report/daily?days=30</code>. ALERT marks a day whose failure "
        f"ratio is above {v.percent(console.config.alert_ratio)}.</p>"
        f'<div class="charts">{"".join(charts)}</div>{table}'
    )
    return html(
        v.frame(
            "Report",
            body,
            viewer=viewer.name,
            csrf=viewer.csrf,
            active="/ui/report",
            jobs=console.jobs,
        )
    )


@page
async def report_day(request: web.Request, viewer: Viewer) -> web.StreamResponse:
    console = request.app[CONSOLE]
    raw = request.match_info["day"]
    try:
        day = date.fromisoformat(raw) if _DAY.fullmatch(raw) else None
    except ValueError:
        day = None
    if day is None:
        return refusal(404, "No such day", "a day is written YYYY-MM-DD", viewer)
    if not viewer.admin:
        return html(
            v.frame(
                f"Report {day}",
                _client_report_note(),
                viewer=viewer.name,
                csrf=viewer.csrf,
                active="/ui/report",
                jobs=console.jobs,
            )
        )
    r = await console.reporter.day(day)
    items = [(k, v.e(r[k])) for k in ("tasks_in", "succeeded", "failed", "retried", "replayed")]
    items += [
        (
            "failure_ratio",
            v.e(v.percent(r["failure_ratio"]))
            + (' <span class="alert">ALERT</span>' if r["alert"] else ""),
        ),
        ("post_replay_success_ratio", v.e(v.percent(r["post_replay_success_ratio"]))),
        ("manual_queue", v.e(r["manual_queue"])),
        ("spend_usd", v.money(r["spend_usd"])),
        ("sync_equivalent_usd", v.money(r["sync_equivalent_usd"])),
        ("savings_usd", v.money(r["savings_usd"])),
        ("unattributed_usd", v.money(r["unattributed_usd"])),
        ("unpriced_models", v.e(", ".join(r["unpriced_models"]) or "none")),
    ]
    lanes = v.table(
        ["lane", "finished", "succeeded", "failed", "fail %", "spend", "$/task", "p50 s", "p95 s"],
        [
            [
                v.e(name),
                v.e(x["finished"]),
                v.e(x["succeeded"]),
                v.e(x["failed"]),
                v.e(v.percent(x["failure_ratio"])),
                v.money(x["spend_usd"]),
                v.money(x["cost_per_task_usd"]),
                v.e(x["latency_p50_seconds"]),
                v.e(x["latency_p95_seconds"]),
            ]
            for name, x in sorted(r["lanes"].items())
        ],
        empty="no task finished this day",
    )
    body = (
        f'{v.pairs(items)}<h2>Lanes</h2>{lanes}<p><a href="'
        f'{v.url("/ui/failed", day=day.isoformat())}">Tasks that failed this day</a> · '
        f'<a href="/ui/report">All 30 days</a></p>'
    )
    return html(
        v.frame(
            f"Report {day}",
            body,
            viewer=viewer.name,
            csrf=viewer.csrf,
            active="/ui/report",
            jobs=console.jobs,
        )
    )


# --------------------------------------------------------------- manual queue


@dataclass(frozen=True, slots=True)
class Filters:
    client: str | None
    model: str | None
    code: str | None
    day: date | None

    def params(self) -> dict[str, str]:
        out = {
            "client": self.client,
            "model": self.model,
            "code": self.code,
            "day": self.day.isoformat() if self.day else None,
        }
        return {k: val for k, val in out.items() if val}


class BadFilter(BatchdError, ValueError):
    """A filter value the page cannot use."""


def _filters(source: Any, viewer: Viewer) -> Filters:
    def text(name: str) -> str | None:
        raw = source.get(name)
        if raw is None or raw == "":
            return None
        if not isinstance(raw, str) or not _FILTER_TEXT.fullmatch(raw):
            raise BadFilter(f"{name} must be 1-200 printable characters")
        return raw.strip() or None

    day_raw = text("day")
    day = None
    if day_raw is not None:
        try:
            if not _DAY.fullmatch(day_raw):
                raise ValueError(day_raw)
            day = date.fromisoformat(day_raw)
        except ValueError:
            raise BadFilter("day must be YYYY-MM-DD") from None
    # A client's own scope is fixed; only an admin chooses a client.
    client = text("client") if viewer.admin else viewer.client
    return Filters(client, text("model"), text("code"), day)


@page
async def manual(request: web.Request, viewer: Viewer) -> web.StreamResponse:
    console = request.app[CONSOLE]
    try:
        f = _filters(request.query, viewer)
    except BadFilter as exc:
        return refusal(400, "Bad filter", str(exc), viewer)
    raw_before = request.query.get("before", "")
    before = int(raw_before) if raw_before.isdigit() and len(raw_before) < 19 else 2**62
    async with console.engine.connect() as conn:
        rows = await sql.manual_page(
            conn,
            client=f.client,
            model=f.model,
            code=f.code,
            day=f.day,
            before=before,
            limit=PAGE_SIZE + 1,
        )
        total = await sql.manual_count(
            conn, client=f.client, model=f.model, code=f.code, day=f.day, cap=MANUAL_COUNT_CAP
        )
        actions = await sql.recent_actions(conn, viewer.client, 10)
    more = len(rows) > PAGE_SIZE
    rows = rows[:PAGE_SIZE]
    shown_total = f"{total:,}+" if total >= MANUAL_COUNT_CAP else f"{total:,}"
    values = f.params()
    filter_inputs = "".join(
        f'<label>{label} <input name="{name}" value="{v.e(values.get(name, ""))}"{kind}></label>'
        for name, label, kind in (
            ("client", "client", ""),
            ("model", "model", ""),
            ("code", "error code", ""),
            ("day", "failed on (UTC)", ' type="date"'),
        )
        if name != "client" or viewer.admin
    )
    filter_form = (
        f'<form method="get" action="/ui/failed" class="filters">{filter_inputs}'
        '<button type="submit">Filter</button> <a href="/ui/failed">clear</a></form>'
    )
    hidden_filters = "".join(
        f'<input type="hidden" name="{k}" value="{v.e(val)}">' for k, val in f.params().items()
    )
    trs = []
    for r in rows:
        trs.append(
            [
                f'<input type="checkbox" name="id" value="{r["id"]}" '
                f'aria-label="choose {v.e(r["custom_id"])}">',
                f'<a href="{v.url("/ui/task", custom_id=r["custom_id"])}">'
                f"{v.e(r['custom_id'])}</a>",
                v.e(r["client"] or "(anonymous)"),
                v.e(r["model"]),
                f"<code>{v.e(v.error_code(r['last_error']))}</code>",
                v.e(v.error_message(r["last_error"])),
                v.e(r["attempts"]),
                v.e(r["replay_count"]),
                v.e(r["finished_at"]),
            ]
        )
    listing = v.table(
        [
            "",
            "custom_id",
            "client",
            "model",
            "error code",
            "last error",
            "attempts",
            "replays",
            "failed at",
        ],
        trs,
        cls="manual",
        empty="the manual queue is empty (for these filters)",
    )
    nav = ""
    if more:
        nav = (
            f'<p><a rel="next" href="'
            f'{v.url("/ui/failed", **f.params(), before=rows[-1]["id"])}">Older \u2192</a></p>'
        )
    buttons = (
        '<button type="submit" name="action" value="replay">Replay chosen</button> '
        '<button type="submit" name="action" value="export">Export chosen</button> '
        '<button type="submit" name="action" value="dismiss">Dismiss chosen</button>'
    )
    act_form = (
        f'<form method="post" action="/ui/failed/action" id="manual-form">'
        f'{v.csrf_field(viewer.csrf)}<input type="hidden" name="scope" value="chosen">'
        f'{listing}<p class="actions">{buttons}</p></form>{nav}'
    )
    all_form = (
        f'<form method="post" action="/ui/failed/action" class="bulk">'
        f'{v.csrf_field(viewer.csrf)}<input type="hidden" name="scope" value="filter">'
        f"{hidden_filters}All tasks matching these filters (up to "
        f"{MAX_ACTION_TASKS:,} at a time): "
        '<button type="submit" name="action" value="replay">Replay all</button> '
        '<button type="submit" name="action" value="export">Export all</button> '
        '<button type="submit" name="action" value="dismiss">Dismiss all</button></form>'
    )
    audit = v.table(
        ["#", "when", "who", "client", "action", "asked", "changed"],
        [
            [
                v.e(a["id"]),
                v.e(a["created_at"]),
                v.e(a["actor"]),
                v.e(a["client"] or "all"),
                v.e(a["action"]),
                v.e(a["requested"]),
                v.e(a["affected"]),
            ]
            for a in actions
        ],
        cls="audit",
        empty="no action taken yet",
    )
    body = (
        f'<p><span class="n" id="manual-total">{shown_total}</span> failed tasks match. '
        "Replay re-queues a task with its attempts reset; dismiss takes it out of the "
        "queue without running it again; export downloads the chosen tasks as JSONL "
        "(the <code>batchd failed export</code> format).</p>"
        f"{filter_form}{act_form}{all_form}<h2>Recent actions</h2>{audit}"
    )
    return html(
        v.frame(
            "Manual queue",
            body,
            viewer=viewer.name,
            csrf=viewer.csrf,
            active="/ui/failed",
            jobs=console.jobs,
        )
    )


@page
async def manual_action(request: web.Request, viewer: Viewer) -> web.StreamResponse:
    console = request.app[CONSOLE]
    form = await request.post()
    action = form.get("action")
    if action not in ("replay", "export", "dismiss"):
        return refusal(400, "Unknown action", "choose replay, export or dismiss", viewer)
    try:
        f = _filters(form, viewer)
    except BadFilter as exc:
        return refusal(400, "Bad filter", str(exc), viewer)
    scope = form.get("scope")
    if scope == "filter":
        async with console.engine.connect() as conn:
            ids = await sql.manual_ids(
                conn, client=f.client, model=f.model, code=f.code, day=f.day, limit=MAX_ACTION_TASKS
            )
    else:
        raw_ids = form.getall("id", [])
        if len(raw_ids) > MAX_ACTION_TASKS or not all(
            isinstance(i, str) and i.isdigit() and len(i) < 19 for i in raw_ids
        ):
            return refusal(400, "Bad choice", f"choose at most {MAX_ACTION_TASKS} tasks", viewer)
        ids = sorted({int(str(i)) for i in raw_ids})
    if not ids:
        return refusal(400, "Nothing chosen", "choose at least one task (tick its box)", viewer)
    async with console.engine.connect() as conn:
        chosen = await sql.chosen_failed(conn, viewer.client, ids)
    bulk = scope == "filter" or len(ids) > 1
    if action != "export" and bulk and form.get("confirm") != "yes":
        return html(
            _confirm_page(viewer, str(action), scope == "filter", f, ids, chosen, console.jobs)
        )
    if action == "export":
        return await _export(request, viewer, ids)
    # Through the API's own replay and dismissal, so the console and POST
    # /v1/failed/replay or /dismiss can never act differently. The chosen
    # rows are the viewer's (chosen_failed is scoped): each named by its own
    # (client, custom_id).
    keys = [(c["client"], c["custom_id"]) for c in chosen]
    if action == "replay":
        outcome = await console.replayer.replay_keys(keys, viewer.client)
    else:
        outcome = await console.replayer.dismiss_keys(keys, viewer.client)
    changed = outcome.replayed
    async with console.engine.begin() as conn:
        audit_id = await sql.record_action(
            conn,
            actor=viewer.name,
            client=viewer.client,
            action=str(action),
            requested=len(ids),
            affected=len(changed),
            detail={
                "task_ids": ids,
                "custom_ids": changed,
                "filters": f.params() if scope == "filter" else None,
            },
        )
    log.info(
        "console.action",
        action=action,
        viewer=viewer.name,
        requested=len(ids),
        affected=len(changed),
        audit_id=audit_id,
    )
    verb = "Replayed" if action == "replay" else "Dismissed"
    listed = "".join(f"<li>{v.e(c)}</li>" for c in changed[:100])
    more = f"<p>and {len(changed) - 100:,} more</p>" if len(changed) > 100 else ""
    skipped = len(ids) - len(changed)
    body = (
        f'<p class="ok" id="action-result">{verb} <span class="n">{len(changed):,}</span> '
        f"of {len(ids):,} chosen tasks (audit #{audit_id})."
        + (
            f" {skipped:,} were no longer failed or are not yours, and were left alone."
            if skipped
            else ""
        )
        + f'</p><ul class="ids">{listed}</ul>{more}'
        f'<p><a href="{v.url("/ui/failed", **f.params())}">Back to the manual queue</a></p>'
    )
    return html(
        v.frame(
            f"{verb} tasks",
            body,
            viewer=viewer.name,
            csrf=viewer.csrf,
            active="/ui/failed",
            jobs=console.jobs,
        )
    )


def _confirm_page(
    viewer: Viewer,
    action: str,
    by_filter: bool,
    f: Filters,
    ids: list[int],
    chosen: list[dict[str, Any]],
    jobs: bool,
) -> str:
    fields = "".join(f'<input type="hidden" name="id" value="{i}">' for i in ids)
    fields += "".join(
        f'<input type="hidden" name="{k}" value="{v.e(val)}">' for k, val in f.params().items()
    )
    names = "".join(f"<li>{v.e(c['custom_id'])}</li>" for c in chosen[:50])
    more = f"<li>and {len(chosen) - 50:,} more</li>" if len(chosen) > 50 else ""
    what = (
        "replay: each goes back to the queue with its attempts reset and is paid for again"
        if action == "replay"
        else "dismiss: each leaves the manual queue and will not run again"
    )
    body = (
        f'<p class="warn">You are about to <strong>{v.e(what)}</strong>. '
        f'<span class="n" id="confirm-count">{len(chosen):,}</span> failed tasks'
        f"{' matching the filters' if by_filter else ''} will change.</p>"
        f'<ul class="ids">{names}{more}</ul>'
        f'<form method="post" action="/ui/failed/action">{v.csrf_field(viewer.csrf)}'
        f'<input type="hidden" name="scope" value="chosen">{fields}'
        f'<input type="hidden" name="confirm" value="yes">'
        f'<button type="submit" name="action" value="{v.e(action)}" class="danger">'
        f"Yes, {v.e(action)} {len(chosen):,} tasks</button> "
        f'<a href="{v.url("/ui/failed", **f.params())}">Cancel</a></form>'
    )
    return v.frame(
        f"Confirm {action}",
        body,
        viewer=viewer.name,
        csrf=viewer.csrf,
        active="/ui/failed",
        jobs=jobs,
    )


async def _export(request: web.Request, viewer: Viewer, ids: list[int]) -> web.StreamResponse:
    console = request.app[CONSOLE]
    async with console.engine.connect() as conn:
        rows = await sql.export_rows(conn, viewer.client, ids)
    async with console.engine.begin() as conn:
        audit_id = await sql.record_action(
            conn,
            actor=viewer.name,
            client=viewer.client,
            action="export",
            requested=len(ids),
            affected=len(rows),
            detail={"task_ids": ids, "custom_ids": [r["custom_id"] for r in rows]},
        )
    log.info(
        "console.action",
        action="export",
        viewer=viewer.name,
        requested=len(ids),
        affected=len(rows),
        audit_id=audit_id,
    )
    body = b"".join(orjson.dumps(export_line(r)) + b"\n" for r in rows)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    return web.Response(
        body=body,
        content_type="application/x-ndjson",
        headers={"Content-Disposition": f'attachment; filename="batchd-failed-{stamp}.jsonl"'},
    )


# ---------------------------------------------------------------- task lookup


@page
async def task_lookup(request: web.Request, viewer: Viewer) -> web.StreamResponse:
    console = request.app[CONSOLE]
    custom_id = request.query.get("custom_id", "")
    search = (
        f'<form method="get" action="/ui/task" class="filters"><label>custom_id '
        f'<input name="custom_id" value="{v.e(custom_id)}" required maxlength="512">'
        '</label><button type="submit">Look up</button></form>'
    )
    if not custom_id:
        return html(
            v.frame(
                "Task lookup",
                search,
                viewer=viewer.name,
                csrf=viewer.csrf,
                active="/ui/task",
                jobs=console.jobs,
            )
        )
    if len(custom_id) > 512 or "\x00" in custom_id:
        return refusal(400, "Bad custom_id", "a custom_id is 1-512 characters", viewer)
    async with console.engine.connect() as conn:
        found = await sql.task_history(conn, viewer.client, custom_id, 200)
    if not found:
        body = search + f'<p class="error" id="not-found">No task {v.e(custom_id)}.</p>'
        return html(
            v.frame(
                "Task lookup",
                body,
                viewer=viewer.name,
                csrf=viewer.csrf,
                active="/ui/task",
                jobs=console.jobs,
            ),
            404,
        )
    parts = [search]
    for t in found:
        facts = v.pairs(
            [
                ("client", v.e(t["client"] or "(anonymous)")),
                ("state", f'<span id="task-state">{v.e(t["state"])}</span>'),
                ("attempts", f'<span id="task-attempts">{v.e(t["attempts"])}</span>'),
                ("replays", v.e(t["replay_count"])),
                ("endpoint", v.e(t["endpoint"])),
                ("model", v.e(t["model"])),
                ("lane", v.e(t["lane"])),
                ("batch", v.e(t["batch_id"])),
                ("created", v.e(t["created_at"])),
                ("submitted", v.e(t["submitted_at"])),
                ("finished", v.e(t["finished_at"])),
                ("not before", v.e(t["not_before"])),
                ("deadline", v.e(t["deadline"])),
                ("metadata", v.json_block(t["metadata"])),
                ("last error", v.json_block(t["last_error"])),
            ]
        )
        result = t["result"]
        res = (
            v.pairs(
                [
                    (
                        k,
                        v.money(result[k])
                        if k.endswith("usd")
                        else v.json_block(result[k])
                        if isinstance(result[k], dict)
                        else v.e(result[k]),
                    )
                    for k in result
                ]
            )
            if result
            else "<p>No result stored.</p>"
        )
        batches = v.table(
            [
                "batch",
                "provider batch",
                "state",
                "provider status",
                "lines",
                "created",
                "finished",
                "routed",
            ],
            [
                [
                    f'<a href="{v.url("/ui/batch", id=b["id"])}">{v.e(b["id"])}</a>',
                    v.e(b["provider_batch_id"]),
                    v.e(b["state"]),
                    v.e(b["provider_status"]),
                    v.e(b["item_count"]),
                    v.e(b["created_at"]),
                    v.e(b["finished_at"]),
                    v.e(b["routed_at"]),
                ]
                for b in t["batches"]
            ],
            empty="never in a batch",
        )
        events = v.table(
            ["when", "attempt", "outcome", "batch", "error"],
            [
                [
                    v.e(ev["created_at"]),
                    v.e(ev["attempt"]),
                    v.e(ev["outcome"]),
                    v.e(ev["batch_id"]),
                    v.e(v.error_code(ev["error"])) + " " + v.e(v.error_message(ev["error"])),
                ]
                for ev in t["events"]
            ],
            cls="events",
            empty="no attempt recorded",
        )
        parts.append(
            f'<section class="task"><h2>{v.e(t["custom_id"])}</h2>{facts}'
            f"<h3>Attempts and outcomes (newest first)</h3>{events}"
            f"<h3>Batches</h3>{batches}<h3>Result</h3>{res}</section>"
        )
    return html(
        v.frame(
            "Task lookup",
            "".join(parts),
            viewer=viewer.name,
            csrf=viewer.csrf,
            active="/ui/task",
            jobs=console.jobs,
        )
    )


# ----------------------------------------------------------------- static, docs


async def static(request: web.Request) -> web.StreamResponse:
    name = request.match_info["name"]
    media = _STATIC_FILES.get(name)
    if media is None:
        raise web.HTTPNotFound(text="no such file")
    response = web.FileResponse(
        STATIC / name, headers={"Content-Type": media, "Cache-Control": "public, max-age=3600"}
    )
    return secure(response)


DOCS_PAGE = """<!doctype html><html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width,initial-scale=1">
<title>batchd API reference</title>
<link rel="stylesheet" href="/ui/static/swagger-ui/swagger-ui.css">
<link rel="stylesheet" href="/ui/static/docs.css">
<link rel="icon" href="/ui/static/favicon.svg" type="image/svg+xml">
</head><body>
<p class="docs-bar"><a href="/ui">batchd console</a> · <a href="/openapi.json">openapi.json</a>
 · <a href="/docs/plain">plain page</a> · Swagger UI 5.36.0 (Apache-2.0,
 <a href="/ui/static/swagger-ui/LICENSE">license</a>)</p>
<noscript><p>This reference is drawn by JavaScript; <a href="/docs/plain">the plain page</a>
has the same document without it.</p></noscript>
<div id="swagger-ui"></div>
<script src="/ui/static/swagger-ui/swagger-ui-bundle.js"></script>
<script src="/ui/static/docs.js"></script>
</body></html>"""


async def docs(_request: web.Request) -> web.StreamResponse:
    return secure(html(DOCS_PAGE), CSP_DOCS)


def setup(app: web.Application, console: Console) -> None:
    """Register the console's and the reference's routes on the API app."""
    app[CONSOLE] = console
    app.router.add_get("/docs", docs)
    app.router.add_get("/ui", overview)
    app.router.add_get("/ui/login", login_form)
    app.router.add_post("/ui/login", login)
    app.router.add_post("/ui/logout", logout)
    app.router.add_get("/ui/report", report)
    app.router.add_get("/ui/report/{day}", report_day)
    app.router.add_get("/ui/failed", manual)
    app.router.add_post("/ui/failed/action", manual_action)
    app.router.add_get("/ui/task", task_lookup)
    app.router.add_get("/ui/batch", batch_page)
    app.router.add_get("/ui/static/{name:.+}", static)
