"""The jobs API (DESIGN section 13). Every route is scoped to one client: a
job name means the caller's job, and another client's job of the same name
is never seen nor touched. An admin token names another client's jobs with
``?client=`` (listed, read, updated, cancelled, results fetched as that
client's); any other token passing another client's name gets 403, as on
every route (web._owner)."""

from __future__ import annotations

from typing import Literal

from aiohttp import web

from batchd import logs
from batchd.contract import JobUpdate, PageSize, Terminal, job_name_problem
from batchd.ingest import IngestError
from batchd.jobs import view_json
from batchd.store import jobs as store
from batchd.store.jobs import FINISHED_STATES
from batchd.web import (
    STATE,
    _client,
    _owner,
    decode_body,
    error_response,
    int_query,
    json_response,
    query,
)

log = logs.get("batchd.web")

# A query parameter's true or false (OpenAPI: a boolean, sent as these words).
Flag = Literal["true", "false"]

_NO_JOB = "no job of yours (or of the client ?client= names) with that name"


def _who(request: web.Request) -> str:
    """Whose jobs the request names: the caller's, or an admin's ?client=."""
    return _owner(request)


def _job(request: web.Request) -> str | None:
    """The job named in the path, or None when no job could have that name."""
    name = request.match_info["job"]
    return None if job_name_problem(name, request.app[STATE].ingest.limits) else name


async def list_jobs(request: web.Request) -> web.Response:
    who = _who(request)
    limit = int_query(request, "limit", PageSize, 100)
    after = request.query.get("after")
    if after is not None and job_name_problem(after, request.app[STATE].ingest.limits):
        raise IngestError(
            400, "invalid_parameter", "after must be a job name from a previous page's next"
        )
    views = await request.app[STATE].jobs.page(who, after, limit)
    has_more = len(views) == limit
    return json_response(
        {
            "jobs": [view_json(v) for v in views],
            "next": views[-1].job if views and has_more else None,
            "has_more": has_more,
        }
    )


async def get_job(request: web.Request) -> web.Response:
    who = _who(request)
    name = _job(request)
    view = await request.app[STATE].jobs.get(who, name) if name else None
    if view is None:
        return error_response(404, "not_found", _NO_JOB)
    return json_response(view_json(view))


async def put_job(request: web.Request) -> web.Response:
    """Set or clear the job's callback_url: ``{"callback_url": "https://..."}``."""
    state = request.app[STATE]
    who = _who(request)
    name = _job(request)
    usage = 'send {"callback_url": "https://..."} (null clears it)'
    url = decode_body(await request.read(), JobUpdate, lambda _field: usage).callback_url
    # The job's client signs the callback, whoever sets the URL.
    problem = state.ingest.callback_problem(url, who)
    if problem:
        raise IngestError(400, "invalid_request", f"callback_url {problem}")
    if name is None or not await state.jobs.set_callback(who, name, url):
        return error_response(404, "not_found", _NO_JOB)
    view = await state.jobs.get(who, name)
    assert view is not None
    return json_response(view_json(view))


async def cancel_job(request: web.Request) -> web.Response:
    who = _who(request)
    name = _job(request)
    done = await request.app[STATE].jobs.cancel(who, name) if name else None
    if done is None:
        return error_response(404, "not_found", _NO_JOB)
    log.info(
        "job.cancel_requested",
        client=who,
        job=name,
        by=_client(request).name,
        cancelled=done.cancelled_now,
    )
    return json_response({**view_json(done.job), "cancelled_now": done.cancelled_now})


async def job_results(request: web.Request) -> web.StreamResponse:
    """The job's finished tasks as NDJSON, in the order the tasks were
    accepted (task id). ``?after=<custom_id>`` resumes after that task's line;
    ``?state=`` keeps one terminal state; ``?stop_at_open=true`` ends before
    the first task not finished yet (a running job's results as they come)."""
    state = request.app[STATE]
    who = _who(request)
    name = _job(request)
    wanted = query(request, "state", Terminal, f"state must be one of {', '.join(FINISHED_STATES)}")
    stop = query(request, "stop_at_open", Flag, "stop_at_open must be true or false")
    if name is None:
        return error_response(404, "not_found", _NO_JOB)
    async with state.engine.connect() as conn:
        if not await store.job_exists(conn, who, name):
            return error_response(404, "not_found", _NO_JOB)
        after = 0
        cursor = request.query.get("after")
        if cursor is not None:
            found = (
                await store.task_id_in_job(conn, who, name, cursor)
                if state.ingest.limits.custom_id_regex.fullmatch(cursor)
                else None
            )
            if found is None:
                return error_response(
                    404,
                    "not_found",
                    "after names no task of this job; pass the custom_id of the last line you read",
                )
            after = found
    response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await response.prepare(request)
    lines = 0
    async for chunk in state.jobs.results(
        who,
        name,
        after=after,
        states=[wanted] if wanted else FINISHED_STATES,
        stop_at_open=stop == "true",
    ):
        await response.write(chunk)
        lines += chunk.count(b"\n")
    await response.write_eof()
    log.info("job.results_sent", job=name, lines=lines)
    return response


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/jobs", list_jobs)
    app.router.add_get("/v1/jobs/{job}", get_job)
    app.router.add_put("/v1/jobs/{job}", put_job)
    app.router.add_post("/v1/jobs/{job}/cancel", cancel_job)
    app.router.add_get("/v1/jobs/{job}/results", job_results)
