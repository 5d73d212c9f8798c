"""Result callbacks: signed, retried, recorded, replayable, and durable."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate
from prometheus_client.parser import text_string_to_metric_families

from batchd.client import SignatureError, verify_callback
from batchd.emulator.openai import Emulator
from batchd.faults import EXIT_CODE
from tests.harness import API_KEY, Harness, chat_task, running
from tests.receiver import Receiver
from tests.spec import SpecCheck

SECRET = "billing-callback-secret-0123456789"  # noqa: S105 (a test secret)
AUTH = {"Authorization": "Bearer tok-billing"}


def tokens_file(tmp_path: Path, default_url: str | None = None) -> Path:
    path = tmp_path / "tokens.toml"
    text = f'[clients.billing]\ntoken = "tok-billing"\ncallback_secret = "{SECRET}"\n'
    if default_url:
        text += f'callback_url = "{default_url}"\n'
    path.write_text(text)
    return path


def callback_settings(
    tmp_path: Path, default_url: str | None = None, **extra: Any
) -> dict[str, Any]:
    return {
        "ingest_tokens_file": tokens_file(tmp_path, default_url),
        "callback_allowed_hosts": "127.0.0.1/32",
        **extra,
    }


async def deliveries_of(h: Harness, custom_id: str) -> list[dict[str, Any]]:
    status, body = await h.get(f"/v1/tasks/{custom_id}/callbacks", headers=AUTH)
    assert status == 200, body
    rows: list[dict[str, Any]] = body["callbacks"]
    return rows


async def test_results_are_posted_signed_to_the_task_or_token_callback_url(
    db_url: str, tmp_path: Path
) -> None:
    receiver = Receiver(SECRET)
    url = await receiver.start()
    try:
        async with running(
            db_url, tmp_path, **callback_settings(tmp_path, default_url=f"{url}/default")
        ) as h:
            status, body = await h.post(
                {
                    "tasks": [
                        chat_task("own-url", callback_url=f"{url}/own"),
                        chat_task("token-default"),
                        chat_task("broken", emulate="http_400", callback_url=f"{url}/own"),
                    ]
                },
                headers=AUTH,
            )
            assert status == 202, body
            await h.run_until_settled()
            await h.service.callbacks.drain()
            _, spec = await h.get("/openapi.json")
        assert all(r.verified for r in receiver.got)
        validate(spec)  # with callbacks on, the document carries the taskFinished webhook
        payload_schema = Draft202012Validator(
            {"$ref": "urn:batchd:openapi#/components/schemas/CallbackPayload"},
            registry=SpecCheck(spec).registry,
        )
        for r in receiver.got:
            assert list(payload_schema.iter_errors(r.payload)) == []
        assert spec["webhooks"]["taskFinished"]["post"]["requestBody"]
        by_id = {r.payload["custom_id"]: r for r in receiver.got}
        assert set(by_id) == {"own-url", "token-default", "broken"}
        assert by_id["token-default"].path == "/default" and by_id["own-url"].path == "/own"
        ok = by_id["own-url"].payload
        assert ok["state"] == "succeeded" and ok["attempts"] == 1
        assert ok["status_code"] == 200 and ok["response"]["object"] == "chat.completion"
        assert ok["last_error"] is None and ok["model"] == "gpt-4o-mini"
        bad = by_id["broken"].payload
        assert bad["state"] == "failed" and bad["response"] is None
        assert bad["last_error"]["status"] == 400
        signed = by_id["own-url"]
        assert signed.headers["Batchd-Delivery"] == ok["delivery_id"]
        assert signed.headers["Batchd-Attempt"] == "1"
        with pytest.raises(SignatureError):
            verify_callback("another-secret-entirely", signed.headers, signed.body)
        with pytest.raises(SignatureError):
            verify_callback(SECRET, signed.headers, signed.body.replace(b"own-url", b"own-urL"))
    finally:
        await receiver.stop()


async def test_a_failing_receiver_gets_the_same_delivery_again_after_a_backoff(
    db_url: str, tmp_path: Path
) -> None:
    receiver = Receiver(SECRET, statuses=[500, 500, 200])
    url = await receiver.start()
    try:
        async with running(
            db_url, tmp_path, **callback_settings(tmp_path, callback_backoff_seconds=30)
        ) as h:
            await h.post(chat_task("flaky-receiver", callback_url=f"{url}/hook"), headers=AUTH)
            await h.run_until_settled()
            for expected_attempts in (1, 2):
                await h.service.callbacks.drain()
                (row,) = await deliveries_of(h, "flaky-receiver")
                assert row["state"] == "pending" and row["attempts"] == expected_attempts
                assert row["last_status"] == 500
                # Backoff: not due again yet; then time passes.
                assert (
                    await h.count("next_attempt_at > now() + interval '10 seconds'", "callbacks")
                    == 1
                )
                assert await h.service.callbacks.tick() == 0
                await h.execute("UPDATE callbacks SET next_attempt_at = now()")
            await h.service.callbacks.drain()
            (row,) = await deliveries_of(h, "flaky-receiver")
        assert row["state"] == "delivered" and row["delivered_at"] is not None
        assert [(a["attempt"], a["status_code"]) for a in row["attempt_log"]] == [
            (1, 500),
            (2, 500),
            (3, 200),
        ]
        # What the receiver said is never kept: only its status, in our words.
        assert row["attempt_log"][0]["error"] == "the receiver answered HTTP 500"
        assert "receiver broken" not in orjson.dumps(row).decode()
        assert [r.headers["Batchd-Attempt"] for r in receiver.got] == ["1", "2", "3"]
        assert len({r.headers["Batchd-Delivery"] for r in receiver.got}) == 1
        assert all(r.verified for r in receiver.got)
    finally:
        await receiver.stop()


async def _cli(*args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "batchd",
        "callbacks",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode() + err.decode()


def _sample(text: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    return 0.0


async def test_exhausted_delivery_is_listed_and_replayable(db_url: str, tmp_path: Path) -> None:
    receiver = Receiver(SECRET, statuses=[503, 503])
    url = await receiver.start()
    try:
        async with running(
            db_url,
            tmp_path,
            **callback_settings(tmp_path, callback_max_attempts=2, callback_backoff_seconds=0),
        ) as h:
            async with h.http.get(f"{h.base_url}/metrics") as r:
                before = await r.text()
            await h.post(chat_task("down-receiver", callback_url=f"{url}/hook"), headers=AUTH)
            await h.run_until_settled()
            await h.service.callbacks.drain()
            status, body = await h.get("/v1/callbacks/failed", headers=AUTH)
            assert status == 200
            (failed,) = body["failed"]
            assert failed["custom_id"] == "down-receiver" and failed["attempts"] == 2
            assert failed["last_status"] == 503 and failed["client"] == "billing"
            await h.service.snapshot()
            async with h.http.get(f"{h.base_url}/metrics") as r:
                middle = await r.text()
            assert _sample(middle, "batchd_callbacks_failed") == 1
            for outcome, n in (("retried", 1), ("failed", 1)):
                name = "batchd_callback_deliveries_total"
                got = _sample(middle, name, outcome=outcome, client="billing") - _sample(
                    before, name, outcome=outcome, client="billing"
                )
                assert got == n, outcome

            code, out = await _cli("failed", "--url", h.base_url, "--token", "tok-billing")
            assert code == 0 and [orjson.loads(x)["id"] for x in out.splitlines()] == [failed["id"]]
            code, out = await _cli(
                "replay",
                "--custom-id",
                "down-receiver",
                "--url",
                h.base_url,
                "--token",
                "tok-billing",
            )
            assert code == 0 and out.startswith(f"1 delivery(ies) due again: {failed['id']}")
            await h.service.callbacks.drain()
            (row,) = await deliveries_of(h, "down-receiver")
            assert row["state"] == "delivered" and row["replay_count"] == 1
            assert [a["status_code"] for a in row["attempt_log"]] == [503, 503, 200]
            assert (await h.get("/v1/callbacks/failed", headers=AUTH))[1]["failed"] == []
            async with h.http.post(
                f"{h.base_url}/v1/callbacks/replay", headers=AUTH, json={"ids": [int(failed["id"])]}
            ) as r:
                assert r.status == 200  # delivered now: nothing to replay
                assert (await r.json())["replayed"] == 0
            async with h.http.post(f"{h.base_url}/v1/callbacks/replay", headers=AUTH, json={}) as r:
                assert r.status == 400
    finally:
        await receiver.stop()


async def test_callback_url_outside_the_allow_list_is_refused_at_ingest(
    db_url: str, tmp_path: Path
) -> None:
    async with running(db_url, tmp_path, **callback_settings(tmp_path)) as h:
        cases = {
            "http://example.com/hook": "BATCHD_CALLBACK_ALLOWED_HOSTS",
            "ftp://127.0.0.1/hook": "http",
            "http://user:pw@127.0.0.1/hook": "credentials",
        }
        for url, says in cases.items():
            status, body = await h.post(
                {"tasks": [chat_task("fine"), chat_task("refused", callback_url=url)]}, headers=AUTH
            )
            assert status == 400, url
            err = body["error"]
            assert err["field"] == "callback_url" and err["custom_id"] == "refused"
            assert err["index"] == 1 and says in err["message"], err
        assert await h.count("true") == 0  # nothing of a refused request is stored
    async with running(db_url, tmp_path) as h:  # no allow-list: callbacks are off
        status, body = await h.post(chat_task("x", callback_url="http://127.0.0.1/hook"))
        assert status == 400 and "callbacks are off" in body["error"]["message"]
    async with running(db_url, tmp_path, callback_allowed_hosts="127.0.0.1/32") as h:
        status, body = await h.post(chat_task("x", callback_url="http://127.0.0.1/hook"))
        assert status == 400 and "no callback secret" in body["error"]["message"]


async def test_sync_lane_results_are_called_back(db_url: str, tmp_path: Path) -> None:
    receiver = Receiver(SECRET)
    url = await receiver.start()
    try:
        async with running(db_url, tmp_path, **callback_settings(tmp_path)) as h:
            await h.post(chat_task("urgent", lane="sync", callback_url=f"{url}/hook"), headers=AUTH)
            await h.service.sync_lane.tick()
            await h.service.sync_lane.wait_calls()
            await h.service.callbacks.drain()
        (got,) = receiver.got
        assert got.verified and got.payload["state"] == "succeeded"
    finally:
        await receiver.stop()


# ------------------------------------------------- crash between state and delivery


async def _serve(env: dict[str, str], log: Path) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "batchd",
        "serve",
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=log.open("ab"),
    )


async def _wait_for(predicate: Any, within: float = 60) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not await predicate():
        if loop.time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.1)


async def test_delivery_survives_a_crash_right_after_the_terminal_state(
    db_url: str, tmp_path: Path
) -> None:
    """The process dies (os._exit, like kill -9) just after routing commits;
    the restarted service delivers what the outbox kept."""
    from sqlalchemy import text

    from batchd.store.engine import make_engine

    receiver = Receiver(SECRET)
    url = await receiver.start()
    emulator = Emulator(api_key=API_KEY)
    emu_url = await emulator.start()
    engine = make_engine(db_url, pool_size=2)

    async def scalar(sql: str) -> Any:
        async with engine.connect() as conn:
            return (await conn.execute(text(sql))).scalar()

    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("BATCHD_")},
        "BATCHD_DATABASE_URL": db_url,
        "BATCHD_DATA_DIR": str(tmp_path / "data"),
        "BATCHD_HTTP_PORT": "0",
        "BATCHD_OPENAI_BASE_URL": emu_url,
        "OPENAI_API_KEY": API_KEY,
        "BATCHD_WINDOW_SECONDS": "0.5",
        "BATCHD_POLL_INTERVAL_SECONDS": "0.2",
        "BATCHD_SCHEDULER_INTERVAL_SECONDS": "0.2",
        "BATCHD_INGEST_TOKENS_FILE": str(tokens_file(tmp_path)),
        "BATCHD_CALLBACK_ALLOWED_HOSTS": "127.0.0.1/32",
        "BATCHD_LOG_LEVEL": "warning",
    }
    log = tmp_path / "serve.log"
    try:
        async with engine.begin() as conn:
            await conn.execute(
                text("""
                INSERT INTO tasks (custom_id, endpoint, model, body, body_digest, line_bytes,
                                   client, callback_url)
                VALUES ('crashy', '/v1/chat/completions', 'gpt-4o-mini',
                        '{"model": "gpt-4o-mini", "messages": []}', 'd', 100,
                        'billing', :url)"""),
                {"url": f"{url}/hook"},
            )
        first = await _serve({**env, "BATCHD_CRASH_AT": "after_route"}, log)
        assert await asyncio.wait_for(first.wait(), 60) == EXIT_CODE, log.read_text()
        assert await scalar("SELECT state FROM tasks") == "succeeded"
        assert await scalar("SELECT state FROM callbacks") == "pending"
        assert receiver.got == []

        second = await _serve(env, log)
        try:
            await _wait_for(lambda: scalar("SELECT state = 'delivered' FROM callbacks"))
        finally:
            second.terminate()
            await asyncio.wait_for(second.wait(), 30)
        (got,) = receiver.got
        assert got.verified and got.payload["custom_id"] == "crashy"
        assert got.payload["state"] == "succeeded"
    finally:
        await engine.dispose()
        await emulator.stop()
        await receiver.stop()


async def test_redirects_are_not_followed_and_a_host_dropped_from_the_list_gets_nothing(
    db_url: str, tmp_path: Path
) -> None:
    receiver = Receiver(SECRET, statuses=[302])
    url = await receiver.start()
    try:
        async with running(
            db_url, tmp_path, **callback_settings(tmp_path, callback_max_attempts=1)
        ) as h:
            await h.post(chat_task("redirected", callback_url=f"{url}/a"), headers=AUTH)
            await h.run_until_settled()
            await h.service.callbacks.drain()
            (row,) = await deliveries_of(h, "redirected")
            assert row["state"] == "failed" and row["last_status"] == 302
            assert len(receiver.got) == 1  # the Location was not followed

            await h.post(chat_task("dropped", callback_url=f"{url}/b"), headers=AUTH)
            await h.run_until_settled()
            # Ops narrow the allow-list after the task was accepted (a restart
            # with a new setting; the sender reads it from its settings).
            h.service.callbacks.allowed_hosts = ("hooks.internal",)
            await h.service.callbacks.drain()
            (row,) = await deliveries_of(h, "dropped")
        assert row["state"] == "failed" and row["attempts"] == 1
        assert "BATCHD_CALLBACK_ALLOWED_HOSTS" in row["last_error"]
        assert len(receiver.got) == 1
    finally:
        await receiver.stop()


async def test_a_callback_cannot_reach_private_addresses_through_a_star_allow_list(
    db_url: str, tmp_path: Path
) -> None:
    """Issue 17: with ``*`` a callback reached localhost, in-cluster services
    and the cloud metadata address, and the target's error body was stored
    and shown back. Now ``*`` means any public address."""
    receiver = Receiver(SECRET, statuses=[500])
    url = await receiver.start()  # http://127.0.0.1:PORT
    port = url.rsplit(":", 1)[1]
    try:
        async with running(
            db_url,
            tmp_path,
            ingest_tokens_file=tokens_file(tmp_path),
            callback_allowed_hosts="*",
            callback_max_attempts=1,
        ) as h:
            for target in (
                f"{url}/hook",
                "http://169.254.169.254/latest/meta-data/",
                "http://10.0.0.1/",
                "http://0.0.0.0:8080/",
            ):
                status, body = await h.post(chat_task("ssrf", callback_url=target), headers=AUTH)
                assert status == 400, target
                assert "non-public address" in body["error"]["message"]
            assert await h.count("true") == 0
            # A name passes the name check, but what it resolves to is checked
            # on every delivery: localhost is loopback, so nothing is sent.
            status, body = await h.post(
                chat_task("by-name", callback_url=f"http://localhost:{port}/hook"), headers=AUTH
            )
            assert status == 202, body
            await h.run_until_settled()
            await h.service.callbacks.drain()
            (row,) = await deliveries_of(h, "by-name")
        assert row["state"] == "failed" and row["last_status"] is None
        assert "non-public address 127.0.0.1" in row["last_error"]
        assert receiver.got == []
    finally:
        await receiver.stop()


async def test_a_cidr_entry_opens_a_private_range_and_the_host_name_is_kept(
    db_url: str, tmp_path: Path
) -> None:
    receiver = Receiver(SECRET, statuses=[500, 200])
    url = await receiver.start()
    port = url.rsplit(":", 1)[1]
    try:
        async with running(
            db_url,
            tmp_path,
            ingest_tokens_file=tokens_file(tmp_path),
            callback_allowed_hosts="localhost,127.0.0.0/8",
            callback_backoff_seconds=0,
        ) as h:
            status, body = await h.post(
                chat_task("named", callback_url=f"http://localhost:{port}/hook"), headers=AUTH
            )
            assert status == 202, body
            await h.run_until_settled()
            await h.service.callbacks.drain()
            await h.execute("UPDATE callbacks SET next_attempt_at = now()")
            await h.service.callbacks.drain()
            (row,) = await deliveries_of(h, "named")
        assert row["state"] == "delivered"
        # The connection went to the checked address; Host still names the URL's host.
        assert [r.headers["Host"] for r in receiver.got] == [f"localhost:{port}"] * 2
        assert row["attempt_log"][0]["error"] == "the receiver answered HTTP 500"
    finally:
        await receiver.stop()


async def test_a_closed_port_reads_as_batchd_words_not_the_socket_error(
    db_url: str, tmp_path: Path
) -> None:
    receiver = Receiver(SECRET)
    url = await receiver.start()
    await receiver.stop()  # nothing listens there now
    async with running(
        db_url, tmp_path, **callback_settings(tmp_path, callback_max_attempts=1)
    ) as h:
        await h.post(chat_task("closed", callback_url=f"{url}/hook"), headers=AUTH)
        await h.run_until_settled()
        await h.service.callbacks.drain()
        (row,) = await deliveries_of(h, "closed")
    assert row["state"] == "failed"
    assert row["last_error"] == "could not connect to the callback host"


def test_a_short_shared_callback_secret_stops_the_start() -> None:
    env = {
        **os.environ,
        "BATCHD_CALLBACK_SECRET": "too-short-a-secret",
        "BATCHD_OPENAI_BASE_URL": "http://127.0.0.1:9/v1",
    }
    done = subprocess.run(
        [sys.executable, "-m", "batchd", "serve"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert done.stderr.startswith("batchd: BATCHD_CALLBACK_SECRET: ")
    assert "32 bytes" in done.stderr and done.stderr.count("\n") == 1
    assert "too-short" not in done.stderr
