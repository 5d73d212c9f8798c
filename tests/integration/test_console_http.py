"""The console over plain HTTP where no browser is needed: no-token mode
(loopback only) and bearer-token access."""

from __future__ import annotations

from pathlib import Path

from tests.harness import running


async def test_with_no_tokens_the_console_opens_on_loopback_names_only(
    db_url: str, tmp_path: Path
) -> None:
    async with running(db_url, tmp_path) as h:
        async with h.http.get(f"{h.base_url}/ui") as r:
            assert r.status == 200
            assert "batchd_session" in r.cookies
            assert "HttpOnly" in r.headers["Set-Cookie"]
            assert "SameSite=Strict" in r.headers["Set-Cookie"]
        # A rebound DNS name that resolves to this machine is refused.
        async with h.http.get(f"{h.base_url}/ui", headers={"Host": "evil.example"}) as r:
            assert r.status == 421


async def test_a_bearer_token_opens_the_console_and_a_bad_one_is_sent_to_log_in(
    db_url: str, tmp_path: Path
) -> None:
    async with running(db_url, tmp_path, ingest_tokens="billing=tok-billing-0123") as h:
        async with h.http.get(
            f"{h.base_url}/ui/failed", headers={"Authorization": "Bearer tok-billing-0123"}
        ) as r:
            assert r.status == 200
            assert "billing" in await r.text()
        async with h.http.get(
            f"{h.base_url}/ui/failed",
            allow_redirects=False,
            headers={"Authorization": "Bearer wrong"},
        ) as r:
            assert r.status == 303
            assert r.headers["Location"].startswith("/ui/login")
        # The API's own auth is unchanged: a console cookie opens no API route.
        async with h.http.get(f"{h.base_url}/v1/failed") as r:
            assert r.status == 401
