"""Clients: one service's tasks are its own (DESIGN section 12).

Each test names the hole it closes: before (client, custom_id) became the
task key, any token read every task, beta's ``ticket-99`` made alpha's a 409
(or a "duplicate" whose result went to beta's callback), ``{"all": true}``
replayed everyone's tasks, and provider files carried the callers' ids.
"""

from __future__ import annotations

import asyncio
import gzip
import re
from pathlib import Path
from typing import Any

import orjson
import pytest

from batchd.cli import main as cli_main
from batchd.config import load_settings
from batchd.domain import line_task_id
from batchd.errors import ConfigError
from batchd.provider.base import RemoteBatch
from batchd.provider.openai import OpenAIProvider
from batchd.service import Service
from batchd.store.engine import make_engine
from tests.harness import Harness, chat_task, running
from tests.receiver import Receiver

ALPHA_SECRET = "alpha-callback-secret-0123456789abcdef"  # noqa: S105 (test secrets)
BETA_SECRET = "beta-callback-secret-0123456789abcdefgh"  # noqa: S105
ALPHA = {"Authorization": "Bearer tok-alpha"}
BETA = {"Authorization": "Bearer tok-beta"}
ADMIN = {"Authorization": "Bearer tok-ops"}
PROVIDER_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


def clients_settings(tmp_path: Path, **extra: Any) -> dict[str, Any]:
    tokens = tmp_path / "tokens.toml"
    tokens.write_text(
        f'[clients.alpha]\ntoken = "tok-alpha"\ncallback_secret = "{ALPHA_SECRET}"\n'
        f'[clients.beta]\ntoken = "tok-beta"\ncallback_secret = "{BETA_SECRET}"\n'
    )
    return {
        "ingest_tokens_file": tokens,
        "admin_tokens": "ops=tok-ops",
        "callback_allowed_hosts": "127.0.0.1/32",
        **extra,
    }


async def _post(h: Harness, auth: dict[str, str], payload: Any, **params: str) -> tuple[int, Any]:
    async with h.http.post(
        f"{h.base_url}/v1/failed/replay" if params.pop("replay", "") else f"{h.base_url}/v1/tasks",
        json=payload,
        headers=auth,
        params=params,
    ) as r:
        return r.status, await r.json()


async def _pages(
    h: Harness, path: str, key: str, auth: dict[str, str], **params: str
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    after = "0"
    while True:
        status, page = await h.get(path, headers=auth, after=after, **params)
        assert status == 200, page
        rows += page[key]
        after = page["next"]
        if not page["has_more"]:
            return rows


async def test_two_clients_share_custom_ids_through_retries_replays_and_callbacks(
    db_url: str, tmp_path: Path
) -> None:
    alpha_rx, beta_rx = Receiver(ALPHA_SECRET), Receiver(BETA_SECRET)
    alpha_url, beta_url = await alpha_rx.start(), await beta_rx.start()
    try:
        async with running(db_url, tmp_path, **clients_settings(tmp_path)) as h:
            # The same custom_ids, different bodies: neither is a 409 or a duplicate.
            status, body = await h.post(
                {
                    "tasks": [
                        chat_task(
                            "ticket-99",
                            content="alpha's",
                            emulate="http_500*1",
                            callback_url=f"{alpha_url}/a",
                        ),
                        chat_task(
                            "ticket-7",
                            content="alpha's",
                            emulate="http_400",
                            callback_url=f"{alpha_url}/a",
                        ),
                    ]
                },
                headers=ALPHA,
            )
            assert (status, body["accepted"], body["duplicates"]) == (202, 2, 0)
            status, body = await h.post(
                {
                    "tasks": [
                        chat_task("ticket-99", content="beta's", callback_url=f"{beta_url}/b"),
                        chat_task(
                            "ticket-7",
                            content="beta's",
                            emulate="http_400",
                            callback_url=f"{beta_url}/b",
                        ),
                        chat_task("beta-only", content="beta's"),
                    ]
                },
                headers=BETA,
            )
            assert (status, body["accepted"], body["duplicates"]) == (202, 3, 0)
            # Duplicate and 409 rules hold within a client, never across.
            status, body = await h.post(
                chat_task("ticket-99", content="beta's", callback_url=f"{beta_url}/b"), headers=BETA
            )
            assert (status, body["duplicates"]) == (202, 1)
            status, body = await h.post(chat_task("ticket-99", content="beta's"), headers=ALPHA)
            assert status == 409 and body["error"]["custom_ids"] == ["ticket-99"]

            await h.run_until_settled()
            await h.service.callbacks.drain()

            a99 = await _task(h, "ticket-99", ALPHA)
            b99 = await _task(h, "ticket-99", BETA)
            assert (a99["client"], a99["state"], a99["attempts"]) == ("alpha", "succeeded", 2)
            assert (b99["client"], b99["state"], b99["attempts"]) == ("beta", "succeeded", 1)
            # Another client's id is a 404, exactly as an id never sent.
            for path in (
                "/v1/tasks/beta-only",
                "/v1/tasks/beta-only/callbacks",
                "/v1/tasks/never-sent",
            ):
                status, body = await h.get(path, headers=ALPHA)
                assert (status, body["error"]["code"]) == (404, "not_found")
            status, _ = await h.get("/v1/tasks/ticket-99", headers=ALPHA, client="beta")
            assert status == 403
            # Listings hold the caller's tasks only.
            results = await _pages(h, "/v1/results", "results", ALPHA)
            assert [(r["client"], r["custom_id"]) for r in results] == [("alpha", "ticket-99")]
            failed = await _pages(h, "/v1/failed", "failed", BETA)
            assert [(r["client"], r["custom_id"]) for r in failed] == [("beta", "ticket-7")]
            status, _ = await h.get("/v1/results", headers=BETA, client="alpha")
            assert status == 403

            # Replays: "all" is all of mine; a named id is mine.
            status, body = await _post(h, ALPHA, {"all": True}, replay="1")
            assert (status, body["custom_ids"]) == (200, ["ticket-7"])
            status, body = await _post(h, ALPHA, {"custom_ids": ["beta-only"]}, replay="1")
            assert body["replayed"] == 0
            assert body["skipped"] == [{"custom_id": "beta-only", "reason": "unknown custom_id"}]
            assert (await _task(h, "ticket-7", BETA))["state"] == "failed"
            assert (await _task(h, "ticket-7", ALPHA))["state"] == "queued"
            status, body = await _post(h, BETA, {"custom_ids": ["ticket-7"]}, replay="1")
            assert body["custom_ids"] == ["ticket-7"]
            await h.run_until_settled()
            await h.service.callbacks.drain()
            for auth in (ALPHA, BETA):
                t7 = await _task(h, "ticket-7", auth)
                assert (t7["state"], t7["replay_count"]) == ("failed", 1)

            # Callbacks: each receiver got its own client's tasks, signed with its secret.
            assert alpha_rx.got and beta_rx.got
            assert all(r.verified for r in alpha_rx.got + beta_rx.got)
            got_a = sorted((r.payload["custom_id"], r.payload["state"]) for r in alpha_rx.got)
            got_b = sorted((r.payload["custom_id"], r.payload["state"]) for r in beta_rx.got)
            assert got_a == [
                ("ticket-7", "failed"),
                ("ticket-7", "failed"),
                ("ticket-99", "succeeded"),
            ]
            assert got_b == got_a
            assert {r.path for r in alpha_rx.got} == {"/a"}
            assert {r.path for r in beta_rx.got} == {"/b"}
            ok_a = next(r.payload for r in alpha_rx.got if r.payload["state"] == "succeeded")
            ok_b = next(r.payload for r in beta_rx.got if r.payload["state"] == "succeeded")
            assert ok_a["attempts"] == 2 and ok_b["attempts"] == 1
            status, body = await h.get("/v1/tasks/ticket-99/callbacks", headers=ALPHA)
            assert status == 200 and [c["client"] for c in body["callbacks"]] == ["alpha"]

            # An admin sees everyone, and ?client= narrows.
            everyone = await _pages(h, "/v1/results", "results", ADMIN)
            assert sorted((r["client"], r["custom_id"]) for r in everyone) == [
                ("alpha", "ticket-99"),
                ("beta", "beta-only"),
                ("beta", "ticket-99"),
            ]
            only_b = await _pages(h, "/v1/failed", "failed", ADMIN, client="beta")
            assert [(r["client"], r["custom_id"]) for r in only_b] == [("beta", "ticket-7")]
            status, view = await h.get("/v1/tasks/ticket-99", headers=ADMIN, client="beta")
            assert (status, view["client"], view["attempts"]) == (200, "beta", 1)

            # Each client's report counts its own tasks; the admin's counts all.
            reports = {}
            for name, auth in (("alpha", ALPHA), ("beta", BETA), ("ops", ADMIN)):
                status, reports[name] = await h.get("/v1/report/daily", headers=auth)
                assert status == 200
            assert (
                reports["alpha"]["tasks_in"],
                reports["beta"]["tasks_in"],
                reports["ops"]["tasks_in"],
            ) == (2, 3, 5)
            assert (reports["alpha"]["replayed"], reports["beta"]["replayed"]) == (1, 1)
            assert reports["alpha"]["retried"] == 1 and reports["beta"]["retried"] == 0

            # Stored side by side, each keyed by its own task.
            rows = await h.rows("""
                SELECT r.client, r.custom_id, t.client AS task_client, t.custom_id AS task_cid
                FROM results r JOIN tasks t ON t.id = r.task_id ORDER BY r.client""")
            assert (
                all(
                    r["client"] == r["task_client"] and r["custom_id"] == r["task_cid"]
                    for r in rows
                )
                and len(rows) == 3
            )
            # Events carry no key of their own (migration 0012): the task's.
            copied = await h.count(
                "e.client IS NOT NULL OR e.custom_id IS NOT NULL", "task_events e"
            )
            assert copied == 0

            # Dismissal is scoped as replay is: "all" is all of mine, a named id
            # is mine (another client's reads as unknown), an admin names whose.
            async def dismiss(auth: dict[str, str], payload: Any, **params: str) -> Any:
                async with h.http.post(
                    f"{h.base_url}/v1/failed/dismiss", json=payload, headers=auth, params=params
                ) as r:
                    assert r.status == 200
                    return await r.json()

            body = await dismiss(ALPHA, {"all": True})
            assert (body["dismissed"], body["custom_ids"]) == (1, ["ticket-7"])
            assert (await _task(h, "ticket-7", BETA))["state"] == "failed"
            body = await dismiss(ALPHA, {"custom_ids": ["beta-only", "ticket-7"]})
            assert body["dismissed"] == 0 and body["skipped"] == [
                {"custom_id": "beta-only", "reason": "unknown custom_id"},
                {
                    "custom_id": "ticket-7",
                    "reason": "dismissed from the manual queue by an operator",
                },
            ]
            body = await dismiss(ADMIN, {"custom_ids": ["ticket-7"]}, client="beta")
            assert body["custom_ids"] == ["ticket-7"]
            assert (await _task(h, "ticket-7", BETA))["state"] == "dismissed"
    finally:
        await alpha_rx.stop()
        await beta_rx.stop()


async def _task(h: Harness, custom_id: str, auth: dict[str, str]) -> dict[str, Any]:
    status, body = await h.get(f"/v1/tasks/{custom_id}", headers=auth)
    assert status == 200, body
    return dict(body)


async def test_provider_files_carry_batchd_ids_and_the_archive_maps_them_back(
    db_url: str, tmp_path: Path
) -> None:
    async with running(db_url, tmp_path, **clients_settings(tmp_path)) as h:
        # Callers' ids the provider could not take (Anthropic's rule) or that collide.
        ids = ["ticket/99:a@b", "x" * 512, "same"]
        for auth in (ALPHA, BETA):
            status, _ = await h.post({"tasks": [chat_task(c) for c in ids]}, headers=auth)
            assert status == 202
        await h.run_until_settled()
        sent = [
            orjson.loads(line)["custom_id"]
            for data in h.emulator.received_files.values()
            for line in data.splitlines()
        ]
        assert len(sent) == 6 and len(set(sent)) == 6
        assert all(PROVIDER_ID.fullmatch(c) for c in sent)
        assert not set(sent) & set(ids)
        # The archive's ids file joins each provider line to the caller's task.
        (batch_id,) = [r["id"] for r in await h.rows("SELECT id FROM batches")]
        archived = h.service.archive.find(batch_id, "ids")
        assert archived is not None
        with gzip.open(archived) as f:
            mapping = {row[0]: (row[1], row[2]) for row in map(orjson.loads, f)}
        assert set(mapping) == set(sent)
        assert sorted(mapping.values()) == sorted((c, i) for c in ("alpha", "beta") for i in ids)
        tasks = {
            r["id"]: (r["client"], r["custom_id"])
            for r in await h.rows("SELECT id, client, custom_id FROM tasks")
        }
        assert all(tasks[line_task_id(lid) or 0] == key for lid, key in mapping.items())
        # Every output line the provider wrote routed to its own task.
        assert await h.count("state = 'succeeded'") == 6


async def test_a_batch_sent_before_the_upgrade_still_routes_by_custom_id(
    db_url: str, tmp_path: Path
) -> None:
    """A batch in flight across the upgrade carries the callers' custom_ids
    (own_line_ids false): its output lines still find their tasks."""
    async with running(db_url, tmp_path) as h:
        await h.post({"tasks": [chat_task("old-1"), chat_task("old-2", emulate="http_400")]})
        await h.age_queue(901)
        assert await h.flush() == 1
        (batch,) = await h.rows("SELECT id, provider_batch_id FROM batches")
        await h.execute("UPDATE batches SET own_line_ids = false")
        out = tmp_path / "old-output.jsonl"
        out.write_bytes(
            b"".join(
                orjson.dumps(line) + b"\n"
                for line in (
                    {
                        "id": "r1",
                        "custom_id": "old-1",
                        "error": None,
                        "response": {
                            "status_code": 200,
                            "request_id": "q1",
                            "body": {
                                "id": "c1",
                                "object": "chat.completion",
                                "model": "gpt-4o-mini",
                                "choices": [],
                                "usage": {
                                    "prompt_tokens": 10,
                                    "completion_tokens": 2,
                                    "total_tokens": 12,
                                },
                            },
                        },
                    },
                    {
                        "id": "r2",
                        "custom_id": "old-2",
                        "error": None,
                        "response": {
                            "status_code": 400,
                            "request_id": "q2",
                            "body": {
                                "error": {
                                    "message": "bad",
                                    "type": "invalid_request_error",
                                    "code": None,
                                }
                            },
                        },
                    },
                )
            )
        )
        remote = RemoteBatch(
            id=batch["provider_batch_id"],
            status="completed",
            endpoint="/v1/chat/completions",
            input_file_id="f",
            created_at=0,
        )
        summary = await h.service.router.route(batch["id"], "gpt-4o-mini", remote, [out])
        assert (summary.succeeded, summary.failed, summary.retried) == (1, 1, 0)
        assert (await h.task("old-1"))["state"] == "succeeded"
        assert (await h.task("old-2"))["state"] == "failed"


async def test_a_batch_claimed_before_the_upgrade_and_sent_after_routes_by_line_ids(
    db_url: str, tmp_path: Path
) -> None:
    """Claimed by an older version (own_line_ids false), uploaded by this one:
    the file carries line ids, and the batch says so before the upload."""
    async with running(db_url, tmp_path) as h:
        await h.post({"tasks": [chat_task("mid-1"), chat_task("mid-2")]})
        await h.age_queue(901)
        pending = await h.service.scheduler._flush_one(drain=False)
        assert pending is not None
        await h.execute("UPDATE batches SET own_line_ids = false")
        await h.service.scheduler.send(pending)
        assert await h.scalar("SELECT own_line_ids FROM batches") is True
        (sent,) = h.emulator.received_files.values()
        assert all(line_task_id(orjson.loads(x)["custom_id"]) for x in sent.splitlines())
        await h.cycle()
        assert await h.count("state = 'succeeded'") == 2


async def test_admin_tokens_are_named_and_consistent(db_url: str, tmp_path: Path) -> None:
    engine = make_engine(db_url, pool_size=1)
    provider = OpenAIProvider(api_key="k", base_url="http://127.0.0.1:9/v1")
    try:
        for admin, says in (
            ("plain-token", "name=token"),
            ("local=t", "name=token"),
            ("alpha=tok-x", "admin = true"),
        ):
            settings = load_settings(
                database_url=db_url,
                data_dir=tmp_path,
                **{**clients_settings(tmp_path), "admin_tokens": admin},
            )
            with pytest.raises(ConfigError) as caught:
                Service(settings, engine, provider)
            assert str(caught.value).startswith("BATCHD_ADMIN_TOKENS:")
            assert says in str(caught.value)
    finally:
        await provider.close()
        await engine.dispose()


async def test_a_tokens_file_admin_sees_every_client(db_url: str, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens.toml"
    tokens.write_text(
        '[clients.alpha]\ntoken = "tok-alpha"\n[clients.ops]\ntoken = "tok-ops"\nadmin = true\n'
    )
    async with running(db_url, tmp_path, ingest_tokens_file=tokens, ingest_tokens="plain-1") as h:
        await h.post(chat_task("a1"), headers=ALPHA)
        await h.post(chat_task("p1"), headers={"Authorization": "Bearer plain-1"})
        status, body = await h.get("/v1/tasks/p1", headers=ALPHA)
        assert status == 404
        status, body = await h.get("/v1/tasks/p1", headers=ADMIN, client="local")
        assert (status, body["client"]) == (200, "local")
        # A plain token is the client 'local': it sees p1, not alpha's a1.
        status, body = await h.get("/v1/tasks/p1", headers={"Authorization": "Bearer plain-1"})
        assert (status, body["client"]) == (200, "local")
        status, _ = await h.get("/v1/tasks/a1", headers={"Authorization": "Bearer plain-1"})
        assert status == 404


async def test_ops_commands_take_a_client(db_url: str, tmp_path: Path) -> None:
    async with running(db_url, tmp_path, **clients_settings(tmp_path)) as h:
        for auth in (ALPHA, BETA):
            await h.post(
                {"tasks": [chat_task("bad", emulate="http_400*1"), chat_task("fine")]}, headers=auth
            )
        await h.run_until_settled()
        base = ["--database-url", db_url, "--data-dir", str(tmp_path / "cli")]
        out = tmp_path / "failed.jsonl"
        code = await asyncio.to_thread(
            cli_main, ["failed", "export", "--out", str(out), "--client", "beta", *base]
        )
        assert code == 0
        lines = [orjson.loads(x) for x in out.read_bytes().splitlines()]
        assert [(x["client"], x["custom_id"]) for x in lines] == [("beta", "bad")]
        everyone = tmp_path / "all.jsonl"
        assert (
            await asyncio.to_thread(cli_main, ["failed", "export", "--out", str(everyone), *base])
            == 0
        )
        assert len(everyone.read_bytes().splitlines()) == 2
        # replay --submit re-queues each line's own task; --client narrows the file.
        assert (
            await asyncio.to_thread(
                cli_main,
                ["replay", "--failed", str(everyone), "--submit", "--client", "alpha", *base],
            )
            == 0
        )
        assert (await _task(h, "bad", ALPHA))["state"] == "queued"
        assert (await _task(h, "bad", BETA))["state"] == "failed"
        report = tmp_path / "report.json"
        code = await asyncio.to_thread(
            _report_to, report, ["report", "--format", "json", "--client", "beta", *base]
        )
        assert code == 0
        doc = orjson.loads(report.read_bytes())
        assert (doc["tasks_in"], doc["failed"], doc["manual_queue"]) == (2, 1, 1)
        # failed dismiss: --custom-id names --client's task; an export's lines
        # name their own client, and --client narrows the file.
        assert (
            await asyncio.to_thread(
                cli_main, ["failed", "dismiss", "--custom-id", "fine", "--client", "beta", *base]
            )
            == 0
        )
        assert (await _task(h, "fine", BETA))["state"] == "succeeded"
        assert (
            await asyncio.to_thread(
                cli_main,
                ["failed", "dismiss", "--exported", str(everyone), "--client", "beta", *base],
            )
            == 0
        )
        assert (await _task(h, "bad", BETA))["state"] == "dismissed"
        assert (await _task(h, "bad", ALPHA))["state"] == "queued"


def _report_to(path: Path, argv: list[str]) -> int:
    import contextlib

    with path.open("w") as f, contextlib.redirect_stdout(f):
        return cli_main(argv)


async def test_an_admin_reaches_another_clients_job_with_client_and_no_one_else_does(
    db_url: str, tmp_path: Path
) -> None:
    """Before: a job name always meant the caller's job, so an admin could not
    read, cancel or fetch the results of a client's job at all."""
    async with running(db_url, tmp_path, **clients_settings(tmp_path)) as h:
        await h.post(
            {"tasks": [chat_task(f"a-{i}", job="nightly") for i in range(3)]}, headers=ALPHA
        )
        await h.post({"tasks": [chat_task("b-0", job="nightly")]}, headers=BETA)

        async def call(
            method: str, path: str, auth: dict[str, str], body: Any = None, **params: str
        ) -> tuple[int, bytes]:
            async with h.http.request(
                method, f"{h.base_url}{path}", headers=auth, params=params, json=body
            ) as r:
                return r.status, await r.read()

        routes = [
            ("GET", "/v1/jobs", None),
            ("GET", "/v1/jobs/nightly", None),
            ("PUT", "/v1/jobs/nightly", {"callback_url": None}),
            ("POST", "/v1/jobs/nightly/cancel", {}),
            ("GET", "/v1/jobs/nightly/results", None),
        ]
        # Beta naming alpha is refused on every route, as on the task routes.
        for method, path, body in routes:
            status, raw = await call(method, path, BETA, body, client="alpha")
            assert status == 403, (method, path)
            assert orjson.loads(raw)["error"]["code"] == "forbidden"
        # Naming itself is its own job.
        status, raw = await call("GET", "/v1/jobs/nightly", BETA, client="beta")
        assert status == 200 and orjson.loads(raw)["tasks"] == 1
        # The admin's own jobs without ?client= (it has none); alpha's with it.
        assert (await call("GET", "/v1/jobs/nightly", ADMIN))[0] == 404
        status, raw = await call("GET", "/v1/jobs", ADMIN, client="alpha")
        assert [j["job"] for j in orjson.loads(raw)["jobs"]] == ["nightly"]
        status, raw = await call("GET", "/v1/jobs/nightly", ADMIN, client="alpha")
        assert orjson.loads(raw)["tasks"] == 3
        status, raw = await call(
            "PUT",
            "/v1/jobs/nightly",
            ADMIN,
            {"callback_url": "http://127.0.0.1:9/done"},
            client="alpha",
        )
        assert status == 200 and orjson.loads(raw)["callback_url"] == "http://127.0.0.1:9/done"
        status, raw = await call("POST", "/v1/jobs/nightly/cancel", ADMIN, {}, client="alpha")
        assert status == 200 and orjson.loads(raw)["cancelled_now"] == 3
        status, raw = await call(
            "GET", "/v1/jobs/nightly/results", ADMIN, client="alpha", state="cancelled"
        )
        assert [orjson.loads(line)["custom_id"] for line in raw.splitlines()] == [
            "a-0",
            "a-1",
            "a-2",
        ]
        status, raw = await call(
            "GET", "/v1/jobs/nightly/results", ADMIN, client="alpha", after="a-0"
        )
        assert [orjson.loads(line)["custom_id"] for line in raw.splitlines()] == ["a-1", "a-2"]
        # Beta's job of the same name was not touched.
        beta = orjson.loads((await call("GET", "/v1/jobs/nightly", BETA))[1])
        assert (beta["queued"], beta["cancelled"], beta["callback_url"]) == (1, 0, None)
        assert (await h.task_as("b-0", BETA))["state"] == "queued"
        # A name no client could have is a 400, not a look-up.
        assert (await call("GET", "/v1/jobs/nightly", ADMIN, client="x\x00"))[0] == 400
