"""The console's jobs pages: each job's progress and cost, cancel, results.

A job is (client, job name), as in DESIGN section 13. A client's token sees
and cancels its own jobs only, whatever the URL says. An admin sees every
client's jobs (``?client=`` narrows the list to one) and names a job of
another client with ``?client=``, as in the jobs API; without it, its own.
Every read and the cancel are the jobs API's own calls (batchd/jobs.py), so
the page and ``GET /v1/jobs/{job}`` cannot disagree, and a cancel from here
does exactly what ``POST /v1/jobs/{job}/cancel`` does, plus the audit row.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from aiohttp import web

from batchd import console_views as v
from batchd import logs
from batchd.clients import is_client_name
from batchd.console import CONSOLE, Viewer, html, page, refusal, secure
from batchd.contract import job_name_problem
from batchd.errors import BatchdError
from batchd.jobs import Jobs
from batchd.store import console as sql
from batchd.store.jobs import FINISHED_STATES, JobView
from batchd.web import STATE

log = logs.get("batchd.console")

JOBS = web.AppKey("console_jobs", Jobs)
PAGE = 50
_NO_JOB = "no job of this client with that name"


class BadClient(BatchdError, ValueError):
    """client must be a client's name (letters, digits, '_', '.', '-')"""


def _client_name(raw: Any) -> str | None:
    """A client named in a URL (None: none named)."""
    if raw is None or raw == "":
        return None
    if not isinstance(raw, str) or not is_client_name(raw):
        raise BadClient(BadClient.__doc__)
    return raw


def _listed(source: Any, viewer: Viewer) -> str | None:
    """Whose jobs the list shows: a client token's own; for an admin the
    client it picked, or every client's (None)."""
    if not viewer.admin:
        return viewer.client
    return _client_name(source.get("client"))


def _owner(source: Any, viewer: Viewer) -> str:
    """Whose job a job page names: a client token's own; an admin's pick,
    else its own (the API's ``_owner``: viewer.name is the admin's client)."""
    if not viewer.admin:
        assert viewer.client is not None
        return viewer.client
    return _client_name(source.get("client")) or viewer.name


def _name(request: web.Request) -> str | None:
    name = request.match_info["job"]
    return None if job_name_problem(name, request.app[STATE].ingest.limits) else name


async def _find(
    request: web.Request, viewer: Viewer
) -> tuple[str, str, JobView] | web.StreamResponse:
    """The job a page names, as (client, name, view), or the page refusing."""
    try:
        client = _owner(request.query, viewer)
    except BadClient as exc:
        return refusal(400, "Bad client", str(exc), viewer)
    name = _name(request)
    j = await request.app[JOBS].get(client, name) if name else None
    if j is None or name is None:
        return refusal(404, "No such job", _NO_JOB, viewer)
    return client, name, j


def _job_url(viewer: Viewer, client: str, job: str, tail: str = "", **params: Any) -> str:
    return v.url(
        f"/ui/jobs/{quote(job, safe='')}{tail}", client=client if viewer.admin else None, **params
    )


def _progress(j: JobView) -> str:
    done = j.succeeded + j.failed + j.cancelled
    share = done / j.tasks if j.tasks else 0.0
    return f'<meter min="0" max="1" value="{share:.3f}"></meter> {done:,}/{j.tasks:,}'


def _picker(request: web.Request, viewer: Viewer, client: str | None) -> str:
    if not viewer.admin:
        return ""
    known = sorted(
        request.app[CONSOLE].clients.names | {viewer.name} | ({client} if client else set())
    )
    options = '<option value="">every client</option>' + "".join(
        f'<option value="{v.e(c)}"{" selected" if c == client else ""}>{v.e(c)}</option>'
        for c in known
    )
    return (
        '<form method="get" action="/ui/jobs" class="filters"><label>client '
        f'<select name="client">{options}</select></label>'
        '<button type="submit">Show</button></form>'
    )


@page
async def jobs_list(request: web.Request, viewer: Viewer) -> web.StreamResponse:
    jobs = request.app[JOBS]
    limits = request.app[STATE].ingest.limits
    try:
        client = _listed(request.query, viewer)
        after_client = _client_name(request.query.get("after_client"))
    except BadClient as exc:
        return refusal(400, "Bad client", str(exc), viewer)
    after = request.query.get("after") or None
    if after is not None and (
        job_name_problem(after, limits) or (client is None and after_client is None)
    ):
        return refusal(400, "Bad cursor", "follow the Older link from the page before", viewer)
    if client is not None:
        views = await jobs.page(client, after, PAGE + 1)
    else:
        views = await jobs.page_all(
            (after_client, after) if after and after_client else None, PAGE + 1
        )
    more = len(views) > PAGE
    views = views[:PAGE]
    every = client is None
    rows = [
        ([v.e(j.client)] if every else [])
        + [
            f'<a href="{_job_url(viewer, j.client, j.job)}">{v.e(j.job)}</a>',
            _progress(j),
            v.e(f"{j.queued:,}"),
            v.e(f"{j.submitted:,}"),
            v.e(f"{j.succeeded:,}"),
            v.e(f"{j.failed:,}"),
            v.e(f"{j.cancelled:,}"),
            v.money(j.spend_usd),
            v.money(j.sync_equivalent_usd - j.spend_usd),
            v.e(j.created_at),
            v.e(j.finished_at),
        ]
        for j in views
    ]
    heads = (["client"] if every else []) + [
        "job",
        "progress",
        "queued",
        "submitted",
        "succeeded",
        "failed",
        "cancelled",
        "spend",
        "saved",
        "created",
        "finished",
    ]
    listing = v.table(heads, rows, cls="jobs", empty="no job yet")
    nav = ""
    if more:
        last = views[-1]
        older = v.url(
            "/ui/jobs",
            client=client if viewer.admin else None,
            after=last.job,
            after_client=last.client if every else None,
        )
        nav = f'<p><a rel="next" href="{older}">Older \u2192</a></p>'
    whose = "every client" if every else f"<strong>{v.e(client)}</strong>"
    body = (
        f"{_picker(request, viewer, client)}<p>Jobs of {whose}, newest first (the "
        f"numbers of <code>GET /v1/jobs</code>).</p>{listing}{nav}"
    )
    return html(v.frame("Jobs", body, viewer=viewer.name, csrf=viewer.csrf, active="/ui/jobs"))


@page
async def job_detail(request: web.Request, viewer: Viewer) -> web.StreamResponse:
    found = await _find(request, viewer)
    if isinstance(found, web.StreamResponse):
        return found
    client, name, j = found
    facts = v.pairs(
        [
            ("client", f'<span id="job-client">{v.e(client)}</span>'),
            ("progress", _progress(j)),
            ("tasks", f'<span id="job-tasks">{j.tasks:,}</span>'),
            ("queued", f'<span id="job-queued">{j.queued:,}</span>'),
            ("submitted", f'<span id="job-submitted">{j.submitted:,}</span>'),
            ("succeeded", f'<span id="job-succeeded">{j.succeeded:,}</span>'),
            ("failed", f'<span id="job-failed">{j.failed:,}</span>'),
            ("cancelled", f'<span id="job-cancelled">{j.cancelled:,}</span>'),
            ("spend", f'<span id="job-spend">{v.money(j.spend_usd)}</span>'),
            ("sync price", v.money(j.sync_equivalent_usd)),
            ("saved", v.money(j.sync_equivalent_usd - j.spend_usd)),
            ("created", v.e(j.created_at)),
            ("finished", v.e(j.finished_at)),
            ("cancelled at", v.e(j.cancelled_at)),
            ("callback", v.e(j.callback_url)),
        ]
    )
    downloads = " · ".join(
        f'<a href="{_job_url(viewer, client, name, "/results", state=s)}">{label}</a>'
        for s, label in [(None, "all finished tasks"), *((s, s) for s in FINISHED_STATES)]
    )
    cancel = "<p>Nothing is left to cancel.</p>"
    if j.open:
        cancel = (
            f'<form method="post" action="{_job_url(viewer, client, name, "/cancel")}">'
            f'{v.csrf_field(viewer.csrf)}<button type="submit">Cancel the job\'s '
            f"{j.queued:,} queued tasks</button></form>"
            '<p class="hint">Tasks already at the provider finish and are stored.</p>'
        )
    body = (
        f"{facts}<h2>Results</h2><p>Download as NDJSON (the lines of "
        f"<code>GET /v1/jobs/{{job}}/results</code>): {downloads}</p>"
        f"<h2>Cancel</h2>{cancel}"
    )
    return html(
        v.frame(f"Job {name}", body, viewer=viewer.name, csrf=viewer.csrf, active="/ui/jobs")
    )


@page
async def job_cancel(request: web.Request, viewer: Viewer) -> web.StreamResponse:
    console = request.app[CONSOLE]
    jobs = request.app[JOBS]
    form = await request.post()
    # An admin's pick is in the form's action URL; a client token's is its
    # own, whatever the URL says.
    found = await _find(request, viewer)
    if isinstance(found, web.StreamResponse):
        return found
    client, name, j = found
    if form.get("confirm") != "yes":
        body = (
            f'<p class="warn">Cancel job <strong>{v.e(name)}</strong> of '
            f'<strong>{v.e(client)}</strong>: its <span class="n" id="confirm-count">'
            f"{j.queued:,}</span> queued tasks become cancelled and are never sent; the "
            f"{j.submitted:,} tasks already at the provider finish.</p>"
            f'<form method="post" action="{_job_url(viewer, client, name, "/cancel")}">'
            f'{v.csrf_field(viewer.csrf)}<input type="hidden" name="confirm" value="yes">'
            '<button type="submit" class="danger">Yes, cancel the job</button> '
            f'<a href="{_job_url(viewer, client, name)}">Back</a></form>'
        )
        return html(
            v.frame(
                f"Confirm cancel {name}",
                body,
                viewer=viewer.name,
                csrf=viewer.csrf,
                active="/ui/jobs",
            )
        )
    done = await jobs.cancel(client, name)
    if done is None:
        return refusal(404, "No such job", _NO_JOB, viewer)
    async with console.engine.begin() as conn:
        audit_id = await sql.record_action(
            conn,
            actor=viewer.name,
            client=client,
            action="cancel_job",
            requested=j.queued,
            affected=done.cancelled_now,
            detail={"job": name},
        )
    log.info(
        "console.action",
        action="cancel_job",
        viewer=viewer.name,
        client=client,
        job=name,
        affected=done.cancelled_now,
        audit_id=audit_id,
    )
    body = (
        f'<p class="ok" id="action-result">Cancelled <span class="n">'
        f"{done.cancelled_now:,}</span> queued tasks of job {v.e(name)} "
        f"(audit #{audit_id}).</p>"
        f'<p><a href="{_job_url(viewer, client, name)}">Back to the job</a></p>'
    )
    return html(
        v.frame("Job cancelled", body, viewer=viewer.name, csrf=viewer.csrf, active="/ui/jobs")
    )


@page
async def job_results(request: web.Request, viewer: Viewer) -> web.StreamResponse:
    wanted = request.query.get("state")
    if wanted is not None and wanted not in FINISHED_STATES:
        return refusal(400, "Bad state", f"state is one of {', '.join(FINISHED_STATES)}", viewer)
    found = await _find(request, viewer)
    if isinstance(found, web.StreamResponse):
        return found
    client, name, _ = found
    jobs = request.app[JOBS]
    filename = f"{client}-{name}-results.jsonl".replace("/", "_")
    response = secure(
        web.StreamResponse(
            headers={
                "Content-Type": "application/x-ndjson",
                "Content-Disposition": f'attachment; filename="{filename}"',
            }
        )
    )
    await response.prepare(request)
    async for chunk in jobs.results(client, name, states=[wanted] if wanted else FINISHED_STATES):
        await response.write(chunk)
    await response.write_eof()
    return response


def setup(app: web.Application, jobs: Jobs) -> None:
    app[JOBS] = jobs
    app.router.add_get("/ui/jobs", jobs_list)
    app.router.add_get("/ui/jobs/{job}", job_detail)
    app.router.add_post("/ui/jobs/{job}/cancel", job_cancel)
    app.router.add_get("/ui/jobs/{job}/results", job_results)
