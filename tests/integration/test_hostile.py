"""Hostile callers at the HTTP edge (issue 17, items 9 and 11): malformed
Authorization headers, cross-site and rebinding requests in no-token mode,
slow request heads and connection floods. Real sockets, real PostgreSQL."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import orjson

from batchd import metrics
from tests.harness import chat_task, running


async def raw_request(port: int, head: bytes, body: bytes = b"") -> tuple[int, bytes]:
    """Send bytes as they are (aiohttp's client would refuse to) and read the reply."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head + body)
        await writer.drain()
        reply = await asyncio.wait_for(reader.read(65536), 10)
    finally:
        writer.close()
    status = int(reply.split(b" ", 2)[1])
    return status, reply.partition(b"\r\n\r\n")[2]


def post_head(
    port: int,
    extra: bytes,
    body: bytes,
    host: bytes | None = None,
    content_type: bytes = b"application/json",
) -> bytes:
    host = host or f"127.0.0.1:{port}".encode()
    return (
        b"POST /v1/tasks HTTP/1.1\r\nHost: "
        + host
        + b"\r\nContent-Type: "
        + content_type
        + b"\r\nContent-Length: "
        + str(len(body)).encode()
        + b"\r\nConnection: close\r\n"
        + extra
        + b"\r\n"
    )


async def test_any_malformed_authorization_header_is_a_401_never_a_500(
    db_url: str, tmp_path: Path
) -> None:
    """Issue 17: an Authorization header that is not UTF-8 gave a 500 with a traceback."""
    body = orjson.dumps(chat_task("auth-probe"))
    async with running(db_url, tmp_path, ingest_tokens="svc=tok-svc") as h:
        port = h.service.port
        assert port is not None
        for header in (
            b"Authorization: Bearer \xff\xfe\xfd",
            b"Authorization: Bearer tok-\xe9",
            b"Authorization: \xff",
            b"Authorization: Basic dG9rLXN2Yzo=",
            b"Authorization: Bearer",
            b"Authorization: Bearer ",
            b"Authorization:",
            b"Authorization: tok-svc",
            b"Authorization: Bearer tok-svc extra",
        ):
            status, reply = await raw_request(port, post_head(port, header + b"\r\n", body), body)
            assert status == 401, (header, reply)
            assert orjson.loads(reply)["error"]["code"] == "unauthorized"
        # The scheme is case-insensitive; the token is not.
        status, _ = await raw_request(
            port, post_head(port, b"Authorization: bearer tok-svc\r\n", body), body
        )
        assert status == 202
        assert await h.count("true") == 1


async def test_no_token_mode_refuses_cross_site_posts_and_rebinding(
    db_url: str, tmp_path: Path
) -> None:
    """Issue 17: with no tokens, a text/plain POST from a web page (or one
    through a rebound DNS name) queued paid work."""
    async with running(db_url, tmp_path) as h:
        port = h.service.port
        assert port is not None
        body = orjson.dumps(chat_task("cross-site"))
        for content_type in (
            b"text/plain",
            b"application/x-www-form-urlencoded",
            b"multipart/form-data; boundary=x",
        ):
            status, reply = await raw_request(
                port, post_head(port, b"", body, content_type=content_type), body
            )
            assert status == 415, (content_type, reply)
        for host in (
            b"attacker.example:%d" % port,
            b"127.0.0.1",
            b"127.0.0.1:1",
            b"rebound.attacker.example",
        ):
            status, reply = await raw_request(port, post_head(port, b"", body, host=host), body)
            assert status == 421, (host, reply)
            assert b"127.0.0.1:%d" % port in reply
        get = (
            b"GET /v1/tasks/cross-site HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n"
        )
        assert (await raw_request(port, get))[0] == 421  # a rebound page cannot read either
        assert await h.count("true") == 0
        for host in (b"127.0.0.1:%d" % port, b"localhost:%d" % port, b"LOCALHOST:%d" % port):
            status, reply = await raw_request(port, post_head(port, b"", body, host=host), body)
            assert status == 202, reply
        status, _ = await raw_request(
            port, post_head(port, b"", body, content_type=b"application/x-ndjson"), body
        )
        assert status == 202
        assert await h.count("true") == 1


async def test_a_slow_request_head_is_cut_off(db_url: str, tmp_path: Path) -> None:
    async with running(db_url, tmp_path, http_header_timeout_seconds=0.5) as h:
        port = h.service.port
        assert port is not None
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        started = time.monotonic()
        writer.write(b"POST /v1/tasks HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # and then nothing
        await writer.drain()
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the server
        assert 0.4 < time.monotonic() - started < 3
        writer.close()
        status, _ = await h.get("/healthz")
        assert status == 200


async def test_connections_past_the_cap_are_closed_at_once(db_url: str, tmp_path: Path) -> None:
    async with running(db_url, tmp_path, http_max_connections=3) as h:
        port = h.service.port
        assert port is not None
        refused_before = metrics.HTTP_CONNECTIONS_REFUSED._value.get()
        held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]
        await asyncio.sleep(0.1)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        for _, w in held:
            w.close()
        await asyncio.sleep(0.2)
        status, _ = await h.get("/healthz")  # room again once they left
        assert status == 200
        assert metrics.HTTP_CONNECTIONS_REFUSED._value.get() == refused_before + 1


def test_serve_without_tokens_warns_that_auth_is_off(db_url: str, tmp_path: Path) -> None:
    env = {
        **os.environ,
        "BATCHD_DATABASE_URL": db_url,
        "BATCHD_HTTP_PORT": "0",
        "BATCHD_DATA_DIR": str(tmp_path),
        "BATCHD_OPENAI_BASE_URL": "http://127.0.0.1:9/v1",
        "BATCHD_LOG_FORMAT": "json",
    }
    env.pop("BATCHD_INGEST_TOKENS", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "batchd", "serve"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 60
        seen = []
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            seen.append(line)
            if "service.auth_off" in line:
                break
        assert any("service.auth_off" in line and '"warning"' in line for line in seen), seen
    finally:
        proc.terminate()
        proc.wait(timeout=60)


async def test_a_3kb_model_fails_its_own_request_only(db_url: str, tmp_path: Path) -> None:
    """Issue 17: a 3 kB ``model`` broke the btree index, the group commit
    failed, and 174 of 200 concurrent requests of another client got 503."""
    # Every model name allowed (BATCHD_ALLOWED_MODELS): here only the shape
    # rule is under test, not which models have a window (test_client_limits).
    async with running(
        db_url, tmp_path, ingest_tokens="alpha=tok-a,beta=tok-b", allowed_models="*"
    ) as h:
        alpha = {"Authorization": "Bearer tok-a"}
        beta = {"Authorization": "Bearer tok-b"}
        poison = h.post(chat_task("huge-model", model="m" * 3000), headers=alpha)
        replies = await asyncio.gather(
            poison, *(h.post(chat_task(f"beta-{i}"), headers=beta) for i in range(200))
        )
        status, body = replies[0]
        assert status == 400 and body["error"]["field"] == "body.model", body
        assert [s for s, _ in replies[1:]] == [202] * 200
        assert await h.count("true") == 200
        for model in ("gpt 4o", "gpt-4o\n", "-leading-dash", "mod\u00e8le", "a/" * 200):
            status, body = await h.post(chat_task("odd-model", model=model), headers=alpha)
            assert status == 400 and body["error"]["field"] == "body.model", model
        for model in (
            "gpt-4o-mini",
            "ft:gpt-4o-mini:acme:v2:AbC123",
            "meta-llama/Llama-3.1-8B@2024",
            "m" * 256,
        ):
            status, body = await h.post(chat_task(f"ok-{len(model)}", model=model), headers=alpha)
            assert status == 202, (model, body)


async def test_a_group_commit_the_database_refuses_is_split_per_request(
    db_url: str, tmp_path: Path
) -> None:
    """Whatever validation misses, a value the database refuses fails only
    the request that carries it, never the others sharing its commit."""
    async with running(db_url, tmp_path, ingest_tokens="alpha=tok-a,beta=tok-b") as h:
        # Stands in for any value PostgreSQL refuses that validation lets through.
        await h.execute(
            "ALTER TABLE tasks ADD CONSTRAINT test_poison CHECK (custom_id NOT LIKE 'poison%')"
        )
        alpha = {"Authorization": "Bearer tok-a"}
        beta = {"Authorization": "Bearer tok-b"}
        for _ in range(3):  # several rounds, so the poison shares a commit at least once
            replies = await asyncio.gather(
                *(
                    h.post(chat_task(f"beta-{i}-{time.monotonic_ns()}"), headers=beta)
                    for i in range(60)
                ),
                h.post(
                    {
                        "tasks": [
                            chat_task(f"fine-{time.monotonic_ns()}"),
                            chat_task(f"poison-{time.monotonic_ns()}"),
                        ]
                    },
                    headers=alpha,
                ),
            )
            assert [s for s, _ in replies[:-1]] == [202] * 60
            status, body = replies[-1]
            assert status == 400 and body["error"]["code"] == "invalid_task", body
        assert await h.count("true") == 180
        assert await h.count("custom_id LIKE 'fine-%'") == 0  # all or nothing
