"""The operator console (/ui) and the API reference (/docs) in a real browser.

One daemon for the module (batchd + the emulator, in a thread of its own so
selenium's blocking calls never stall its event loop), loaded by a script:
three clients' tasks, some of which the emulator fails for good. Debian's
chromium is driven through chromedriver; nothing is downloaded at run time.
Screenshots of every page go to tests/output/console/ (gitignored).
"""

from __future__ import annotations

import asyncio
import os
import re
import threading
import uuid
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest
from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.chrome.service import Service as ChromeService
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from batchd.store.engine import async_url
from tests.conftest import _admin, _with_db
from tests.harness import Harness, chat_task, running

pytestmark = pytest.mark.browser

CHROMIUM = Path(os.environ.get("BATCHD_TEST_CHROMIUM", "/usr/bin/chromium"))
CHROMEDRIVER = Path(os.environ.get("BATCHD_TEST_CHROMEDRIVER", "/usr/bin/chromedriver"))
SHOTS = Path(__file__).resolve().parents[1] / "output" / "console"
ADMIN, BILLING, SEARCH = (
    "admin-token-0123456789",
    "billing-token-0123456789",
    "search-token-0123456789",
)
T = TypeVar("T")

if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
    pytest.skip(
        "needs Debian's chromium and chromium-driver (.ci/run installs them: "
        "apt-get install -y chromium chromium-driver)",
        allow_module_level=True,
    )


@dataclass
class Daemon:
    h: Harness
    loop: asyncio.AbstractEventLoop

    @property
    def url(self) -> str:
        return self.h.base_url

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=120)

    def api(self, path: str, token: str = ADMIN, **params: str) -> Any:
        status, body = self.run(self.h.get(path, {"Authorization": f"Bearer {token}"}, **params))
        assert status == 200, (path, status, body)
        return body

    def states(self) -> dict[str, str]:
        rows = self.run(self.h.rows("SELECT custom_id, state FROM tasks"))
        return {r["custom_id"]: r["state"] for r in rows}


async def _load(h: Harness) -> None:
    """The scripted load: per client some tasks that succeed and some the
    emulator fails for good (HTTP 400: straight to the manual queue)."""
    for token, prefix, ok, bad in ((BILLING, "b", 6, 4), (SEARCH, "s", 4, 3), (ADMIN, "a", 2, 1)):
        tasks = [chat_task(f"{prefix}-ok-{i}") for i in range(ok)]
        tasks += [chat_task(f"{prefix}-bad-{i}", emulate="http_400") for i in range(bad)]
        if prefix == "b":  # billing's nightly job: three that succeed, one that fails
            tasks += [chat_task(f"n-ok-{i}", job="nightly") for i in range(3)]
            tasks += [chat_task("n-bad-0", job="nightly", emulate="http_400")]
        if prefix == "s":  # search's own job of the same name
            tasks += [chat_task(f"sn-ok-{i}", job="nightly") for i in range(2)]
        status, body = await h.post({"tasks": tasks}, headers={"Authorization": f"Bearer {token}"})
        assert status == 202, body
    await h.run_until_settled()
    # At the provider, never polled: the overview's batches in flight.
    status, _ = await h.post(
        {"tasks": [chat_task(f"b-live-{i}") for i in range(5)]},
        headers={"Authorization": f"Bearer {BILLING}"},
    )
    assert status == 202
    assert await h.flush(drain=True) == 1
    # Left queued: the overview's windows.
    status, _ = await h.post(
        {"tasks": [chat_task(f"b-wait-{i}", model="gpt-4o") for i in range(3)]},
        headers={"Authorization": f"Bearer {BILLING}"},
    )
    assert status == 202
    # Billing's backfill, queued in a window of its own: a job left to cancel.
    status, _ = await h.post(
        {"tasks": [chat_task(f"bf-{i}", model="gpt-4.1", job="backfill") for i in range(2)]},
        headers={"Authorization": f"Bearer {BILLING}"},
    )
    assert status == 202


@pytest.fixture(scope="module")
def daemon(
    pg_admin_url: str, template_db: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Daemon]:
    name = f"batchd_console_{uuid.uuid4().hex[:10]}"
    asyncio.run(_admin(pg_admin_url, f'CREATE DATABASE "{name}" TEMPLATE "{template_db}"'))
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    cm = running(
        async_url(_with_db(pg_admin_url, name)),
        tmp_path_factory.mktemp("console"),
        ingest_tokens=f"billing={BILLING},search={SEARCH}",
        admin_tokens=f"admin={ADMIN}",
    )
    h = asyncio.run_coroutine_threadsafe(cm.__aenter__(), loop).result(60)
    d = Daemon(h, loop)
    try:
        d.run(_load(h))
        yield d
    finally:
        d.run(cm.__aexit__(None, None, None))
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
        asyncio.run(_admin(pg_admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[webdriver.Chrome]:
    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must never fetch a driver
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1400,1000",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium')}",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=ChromeService(str(CHROMEDRIVER)))
    driver.set_page_load_timeout(30)
    SHOTS.mkdir(parents=True, exist_ok=True)
    try:
        yield driver
    finally:
        driver.quit()


def forget_sessions(driver: webdriver.Chrome, d: Daemon) -> None:
    """Drop the console cookies (path /ui: visible from a /ui page only)."""
    driver.get(f"{d.url}/ui/login")
    driver.delete_all_cookies()


def login(driver: webdriver.Chrome, d: Daemon, token: str) -> None:
    forget_sessions(driver, d)
    driver.get(f"{d.url}/ui/login")
    driver.find_element(By.NAME, "token").send_keys(token)
    driver.find_element(By.CSS_SELECTOR, "form.login button").click()
    WebDriverWait(driver, 10).until(lambda drv: drv.current_url.rstrip("/").endswith("/ui"))


def visit(
    driver: webdriver.Chrome, url: str, shot: str | None = None, *, not_found: bool = False
) -> str:
    """Open a page; fail on any console message at error level (but the
    page's own 404 when ``not_found``); screenshot it."""
    driver.get_log("browser")  # type: ignore[no-untyped-call]  # drop what earlier pages left
    driver.get(url)
    WebDriverWait(driver, 10).until(
        lambda drv: drv.execute_script("return document.readyState") == "complete"
    )
    errors = [
        m
        for m in driver.get_log("browser")  # type: ignore[no-untyped-call]
        if m["level"] == "SEVERE"
        and not (
            not_found and m["message"].startswith(f"{url} - ") and "(Not Found)" in m["message"]
        )
    ]
    assert not errors, errors
    if shot:
        driver.save_screenshot(str(SHOTS / f"{shot}.png"))
    return str(driver.page_source)


def text_of(driver: webdriver.Chrome, css: str) -> str:
    return str(driver.find_element(By.CSS_SELECTOR, css).text)


def test_every_console_page_renders_without_console_errors(
    daemon: Daemon, browser: webdriver.Chrome
) -> None:
    login(browser, daemon, ADMIN)
    today = daemon.api("/v1/report/daily")["date"]
    batch = daemon.run(daemon.h.scalar("SELECT id FROM batches ORDER BY created_at LIMIT 1"))
    pages = {
        "overview": "/ui",
        "report": "/ui/report",
        "report-day": f"/ui/report/{today}",
        "manual-queue": "/ui/failed",
        "task": "/ui/task?custom_id=b-bad-0",
        "batch": f"/ui/batch?id={batch}",
        "jobs": "/ui/jobs",
        "job": "/ui/jobs/nightly?client=billing",
        "login": "/ui/login",
    }
    for shot, path in pages.items():
        page = visit(browser, daemon.url + path, shot)
        assert "<h1>" in page, path
        assert "Traceback" not in page
    # Charts are drawn server-side: four SVGs, the ALERT line among them.
    visit(browser, daemon.url + "/ui/report")
    assert len(browser.find_elements(By.CSS_SELECTOR, "svg.chart")) == 4
    assert browser.find_elements(By.CSS_SELECTOR, "svg.chart line.threshold")


def test_pages_send_a_strict_content_security_policy(daemon: Daemon) -> None:
    async def heads() -> dict[str, str]:
        async with daemon.h.http.get(f"{daemon.url}/ui/login") as r:
            ui = r.headers["Content-Security-Policy"]
            page = await r.text()
        async with daemon.h.http.get(f"{daemon.url}/docs") as r:
            docs = r.headers["Content-Security-Policy"]
            doc_page = await r.text()
        assert "<script>" not in page and "<script>" not in doc_page  # no inline script
        assert "cdn" not in doc_page.lower() and "https://" not in doc_page
        return {"ui": ui, "docs": docs}

    csp = daemon.run(heads())
    assert "script-src" not in csp["ui"] and "default-src 'none'" in csp["ui"]
    assert "script-src 'self';" in csp["docs"] and "unsafe-eval" not in csp["docs"]


def test_overview_and_report_numbers_equal_the_api(
    daemon: Daemon, browser: webdriver.Chrome
) -> None:
    login(browser, daemon, ADMIN)
    day = daemon.api("/v1/report/daily")
    visit(browser, daemon.url + "/ui")
    assert text_of(browser, "#failure-ratio") == f"{day['failure_ratio'] * 100:.2f}%"
    assert text_of(browser, "#manual-queue") == str(day["manual_queue"])
    live = browser.find_elements(By.CSS_SELECTOR, "table.batches tbody tr")
    assert len(live) == 1 and "0/5" in live[0].text
    queued = {
        (w.find_elements(By.TAG_NAME, "td")[2].text, w.find_elements(By.TAG_NAME, "td")[3].text)
        for w in browser.find_elements(By.CSS_SELECTOR, "table.windows tbody tr")
    }
    assert ("gpt-4o", "3") in queued
    visit(browser, daemon.url + "/ui/report")
    row = browser.find_elements(By.CSS_SELECTOR, "table.report tbody tr")[0]
    cells = [c.text for c in row.find_elements(By.TAG_NAME, "td")]
    assert cells[:6] == [
        day["date"],
        str(day["tasks_in"]),
        str(day["succeeded"]),
        str(day["failed"]),
        str(day["retried"]),
        str(day["replayed"]),
    ]
    assert cells[8] == f"${day['spend_usd']}" and cells[10] == f"${day['savings_usd']}"
    failed = daemon.api("/v1/failed", limit="1000")["failed"]
    visit(browser, daemon.url + "/ui/failed")
    assert text_of(browser, "#manual-total") == str(len(failed))
    task = daemon.api("/v1/tasks/s-bad-1", client="search")
    visit(browser, daemon.url + "/ui/task?custom_id=s-bad-1")
    assert text_of(browser, "#task-state") == task["state"] == "failed"
    assert text_of(browser, "#task-attempts") == str(task["attempts"])


def _tick(driver: webdriver.Chrome, custom_id: str) -> None:
    for row in driver.find_elements(By.CSS_SELECTOR, "table.manual tbody tr"):
        if row.find_elements(By.TAG_NAME, "td")[1].text == custom_id:
            row.find_element(By.CSS_SELECTOR, "input[type=checkbox]").click()
            return
    raise AssertionError(f"{custom_id} is not on the page")


def test_replay_from_the_page_requeues_exactly_the_chosen_tasks(
    daemon: Daemon, browser: webdriver.Chrome
) -> None:
    login(browser, daemon, ADMIN)
    before = daemon.states()
    visit(browser, daemon.url + "/ui/failed")
    _tick(browser, "b-bad-1")
    _tick(browser, "s-bad-2")
    browser.find_element(By.CSS_SELECTOR, "button[value=replay]").click()
    # Two tasks: a bulk action, so a confirmation page first; nothing changed yet.
    WebDriverWait(browser, 10).until(lambda drv: "Confirm replay" in drv.title)
    assert text_of(browser, "#confirm-count") == "2"
    browser.save_screenshot(str(SHOTS / "confirm-replay.png"))
    assert daemon.states() == before
    browser.find_element(By.CSS_SELECTOR, "button.danger").click()
    WebDriverWait(browser, 10).until(lambda drv: drv.find_elements(By.ID, "action-result"))
    assert "Replayed 2 of 2" in text_of(browser, "#action-result")
    after = daemon.states()
    changed = {cid for cid in after if after[cid] != before.get(cid)}
    assert changed == {"b-bad-1", "s-bad-2"}
    assert after["b-bad-1"] == after["s-bad-2"] == "queued"
    replays = daemon.run(
        daemon.h.rows("SELECT custom_id, replay_count, attempts FROM tasks WHERE replay_count > 0")
    )
    assert {r["custom_id"] for r in replays} == {"b-bad-1", "s-bad-2"}
    assert all(r["attempts"] == 0 for r in replays)
    audit = daemon.run(
        daemon.h.rows(
            "SELECT actor, action, requested, affected, detail FROM console_actions "
            "WHERE action = 'replay' ORDER BY id DESC LIMIT 1"
        )
    )[0]
    assert (audit["actor"], audit["requested"], audit["affected"]) == ("admin", 2, 2)
    assert sorted(audit["detail"]["custom_ids"]) == ["b-bad-1", "s-bad-2"]


def test_a_client_token_sees_and_acts_on_its_own_rows_only(
    daemon: Daemon, browser: webdriver.Chrome
) -> None:
    login(browser, daemon, SEARCH)
    page = visit(browser, daemon.url + "/ui/failed", "manual-queue-search")
    shown = {
        r.find_elements(By.TAG_NAME, "td")[1].text
        for r in browser.find_elements(By.CSS_SELECTOR, "table.manual tbody tr")
    }
    assert shown and all(cid.startswith("s-") for cid in shown)
    assert "b-bad" not in page and "a-bad" not in page
    # The client filter is the token's, whatever the URL says.
    page = visit(browser, daemon.url + "/ui/failed?client=billing")
    assert "b-bad" not in page
    visit(browser, daemon.url + "/ui/task?custom_id=b-bad-0", not_found=True)
    assert browser.find_elements(By.ID, "not-found")
    page = visit(browser, daemon.url + "/ui")
    assert "gpt-4o<" not in page  # billing's queued window
    visit(browser, daemon.url + "/ui/report")
    assert not browser.find_elements(By.CSS_SELECTOR, "table.report")
    # A forged choice of billing's task is left alone.
    billing_id = daemon.run(daemon.h.scalar("SELECT id FROM tasks WHERE custom_id = 'b-bad-3'"))
    visit(browser, daemon.url + "/ui/failed")
    browser.execute_script(
        "var b = document.querySelector('input[name=id]'); b.value = arguments[0];"
        "b.checked = true;",
        str(billing_id),
    )
    browser.find_element(By.CSS_SELECTOR, "button[value=dismiss]").click()
    WebDriverWait(browser, 10).until(lambda drv: drv.find_elements(By.TAG_NAME, "h1"))
    assert daemon.states()["b-bad-3"] == "failed"


async def _session(d: Daemon, token: str) -> tuple[aiohttp.ClientSession, str]:
    """A logged-in HTTP session (cookie jar) and the CSRF token its pages carry."""
    http = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))
    async with http.get(f"{d.url}/ui/login") as r:
        nonce = re.search(r'name="csrf" value="([^"]+)"', await r.text())
    assert nonce
    async with http.post(
        f"{d.url}/ui/login", data={"csrf": nonce[1], "token": token}, allow_redirects=False
    ) as r:
        assert r.status == 303
    async with http.get(f"{d.url}/ui/failed") as r:
        found = re.search(r'name="csrf" value="([^"]+)"', await r.text())
    assert found
    return http, found[1]


def test_forms_without_the_csrf_token_are_refused(daemon: Daemon) -> None:
    task_id = str(daemon.run(daemon.h.scalar("SELECT id FROM tasks WHERE custom_id = 'b-bad-2'")))

    async def attempts() -> list[int]:
        http, csrf = await _session(daemon, ADMIN)
        statuses = []
        try:
            form = {"action": "dismiss", "scope": "chosen", "id": task_id}
            for data, headers in (
                (form, {}),  # no token
                ({**form, "csrf": "forged"}, {}),  # wrong token
                ({**form, "csrf": csrf}, {"Origin": "http://evil.example"}),
            ):  # other site
                async with http.post(
                    f"{daemon.url}/ui/failed/action", data=data, headers=headers
                ) as r:
                    statuses.append(r.status)
            async with http.post(f"{daemon.url}/ui/logout", data={}) as r:
                statuses.append(r.status)
            # Another session's token is refused too: it is bound to the session.
            other, other_csrf = await _session(daemon, BILLING)
            await other.close()
            async with http.post(
                f"{daemon.url}/ui/failed/action", data={**form, "csrf": other_csrf}
            ) as r:
                statuses.append(r.status)
        finally:
            await http.close()
        async with aiohttp.ClientSession() as fresh:  # login without its form nonce
            async with fresh.post(f"{daemon.url}/ui/login", data={"token": ADMIN}) as r:
                statuses.append(r.status)
        return statuses

    assert daemon.run(attempts()) == [403] * 6
    assert daemon.states()["b-bad-2"] == "failed"


def test_export_and_dismiss_from_the_page_are_audited(daemon: Daemon) -> None:
    rows = daemon.run(
        daemon.h.rows("SELECT id, custom_id FROM tasks WHERE custom_id IN ('a-bad-0', 'b-bad-0')")
    )
    ids = {r["custom_id"]: str(r["id"]) for r in rows}

    async def act() -> tuple[str, str]:
        http, csrf = await _session(daemon, ADMIN)
        try:
            async with http.post(
                f"{daemon.url}/ui/failed/action",
                data=[
                    ("csrf", csrf),
                    ("action", "export"),
                    ("scope", "chosen"),
                    ("id", ids["a-bad-0"]),
                    ("id", ids["b-bad-0"]),
                ],
            ) as r:
                assert r.status == 200
                assert r.headers["Content-Disposition"].startswith("attachment")
                exported = await r.text()
            async with http.post(
                f"{daemon.url}/ui/failed/action",
                data=[
                    ("csrf", csrf),
                    ("action", "dismiss"),
                    ("scope", "chosen"),
                    ("id", ids["a-bad-0"]),
                ],
            ) as r:
                assert r.status == 200
                dismissed = await r.text()
        finally:
            await http.close()
        return exported, dismissed

    exported, dismissed = daemon.run(act())
    lines = [line for line in exported.splitlines() if line]
    found = [re.search(r'"custom_id":"([^"]+)"', x) for x in lines]
    assert sorted(m[1] for m in found if m) == ["a-bad-0", "b-bad-0"]
    assert all(found)
    assert "Dismissed 1 of 1" in re.sub("<[^>]+>", "", dismissed)
    assert daemon.states()["a-bad-0"] == "dismissed"
    failed = {r["custom_id"] for r in daemon.api("/v1/failed", limit="1000")["failed"]}
    assert "a-bad-0" not in failed and "b-bad-0" in failed
    actions = daemon.run(
        daemon.h.rows(
            "SELECT action, affected FROM console_actions WHERE action IN ('export', 'dismiss') "
            "ORDER BY id"
        )
    )
    assert {(a["action"], a["affected"]) for a in actions} >= {("export", 2), ("dismiss", 1)}


def test_api_reference_renders_the_document_and_tries_it_with_a_token(
    daemon: Daemon, browser: webdriver.Chrome
) -> None:
    visit(browser, daemon.url + "/docs")
    wait = WebDriverWait(browser, 20)
    wait.until(lambda drv: drv.find_elements(By.CSS_SELECTOR, ".opblock"))
    browser.save_screenshot(str(SHOTS / "docs.png"))
    (SHOTS / "docs.html").write_text(browser.page_source)
    body = browser.find_element(By.TAG_NAME, "body").text
    assert '{"$ref"' not in body and "#/components/schemas" not in body
    # Markdown in descriptions is rendered: backticks become <code>.
    info = browser.find_element(By.CSS_SELECTOR, ".info .description")
    assert info.find_elements(By.TAG_NAME, "code") and "`" not in info.text
    # A schema expands, its $ref resolved into properties.
    error_schema = next(
        a
        for a in browser.find_elements(
            By.CSS_SELECTOR, "section.models article.json-schema-2020-12"
        )
        if a.find_element(By.CSS_SELECTOR, ".json-schema-2020-12__title").text == "Error"
    )
    error_schema.find_element(
        By.CSS_SELECTOR, "button.json-schema-2020-12-expand-deep-button"
    ).click()
    wait.until(lambda drv: "message" in error_schema.text)
    assert "code" in error_schema.text and "$ref" not in error_schema.text
    # Try it: authorize with a token, then call GET /v1/failed from the page.
    browser.find_element(By.CSS_SELECTOR, "button.authorize").click()
    wait.until(lambda drv: drv.find_elements(By.CSS_SELECTOR, ".modal-ux input"))
    browser.find_element(By.CSS_SELECTOR, ".modal-ux input").send_keys(ADMIN)
    browser.find_element(By.CSS_SELECTOR, ".modal-ux button.authorize").click()
    browser.find_element(By.CSS_SELECTOR, ".modal-ux button.btn-done").click()
    op = browser.find_element(By.CSS_SELECTOR, "[id$='-listFailed']")
    op.find_element(By.CSS_SELECTOR, ".opblock-summary").click()
    wait.until(lambda drv: op.find_elements(By.CSS_SELECTOR, "button.try-out__btn"))
    op.find_element(By.CSS_SELECTOR, "button.try-out__btn").click()
    op.find_element(By.CSS_SELECTOR, "button.execute").click()
    try:
        wait.until(
            lambda drv: op.find_elements(
                By.CSS_SELECTOR, ".live-responses-table tbody .response-col_status"
            )
        )
    except TimeoutException:
        browser.save_screenshot(str(SHOTS / "docs-try-failed.png"))
        raise
    status = op.find_element(By.CSS_SELECTOR, ".live-responses-table tbody .response-col_status")
    assert status.text.strip().startswith("200")
    browser.save_screenshot(str(SHOTS / "docs-try-it.png"))
    errors = [
        m
        for m in browser.get_log("browser")  # type: ignore[no-untyped-call]
        if m["level"] == "SEVERE"
    ]
    assert not errors, errors


def test_console_without_a_session_sends_the_browser_to_log_in(
    daemon: Daemon, browser: webdriver.Chrome
) -> None:
    forget_sessions(browser, daemon)
    visit(browser, daemon.url + "/ui/failed")
    assert "/ui/login" in browser.current_url
    browser.find_element(By.NAME, "token").send_keys("not-a-token")
    browser.find_element(By.CSS_SELECTOR, "form.login button").click()
    WebDriverWait(browser, 10).until(lambda drv: "not valid" in drv.page_source)
    browser.find_element(By.NAME, "token").send_keys(BILLING)
    browser.find_element(By.CSS_SELECTOR, "form.login button").click()
    WebDriverWait(browser, 10).until(lambda drv: drv.current_url.endswith("/ui/failed"))
    assert "billing" in text_of(browser, "header .who")


def _job_rows(driver: webdriver.Chrome) -> list[list[str]]:
    return [
        [c.text for c in r.find_elements(By.TAG_NAME, "td")]
        for r in driver.find_elements(By.CSS_SELECTOR, "table.jobs tbody tr")
    ]


def test_jobs_pages_show_the_api_numbers_each_client_its_own(
    daemon: Daemon, browser: webdriver.Chrome
) -> None:
    login(browser, daemon, BILLING)
    visit(browser, daemon.url + "/ui/jobs", "jobs-billing")
    assert sorted(r[0] for r in _job_rows(browser)) == ["backfill", "nightly"]
    for token, owner in ((BILLING, "billing"), (SEARCH, "search")):
        login(browser, daemon, token)
        api = daemon.api("/v1/jobs/nightly", token)
        # A client token's job is its own, whatever ?client= says.
        visit(browser, daemon.url + "/ui/jobs/nightly?client=billing")
        assert text_of(browser, "#job-client") == owner
        for key in ("tasks", "queued", "submitted", "succeeded", "failed", "cancelled"):
            assert text_of(browser, f"#job-{key}") == f"{api[key]:,}", (owner, key)
        assert text_of(browser, "#job-spend") == f"${Decimal(api['spend_usd']):.6f}"
    assert text_of(browser, "#job-tasks") == "2"  # search's nightly, not billing's four
    visit(browser, daemon.url + "/ui/jobs/backfill?client=billing", not_found=True)
    assert "No such job" in browser.title
    # The admin sees every client's jobs, and one client's when it picks one.
    login(browser, daemon, ADMIN)
    visit(browser, daemon.url + "/ui/jobs", "jobs")
    assert {(r[0], r[1]) for r in _job_rows(browser)} == {
        ("billing", "nightly"),
        ("billing", "backfill"),
        ("search", "nightly"),
    }
    visit(browser, daemon.url + "/ui/jobs?client=search")
    assert [r[0] for r in _job_rows(browser)] == ["nightly"]


def test_job_results_download_equals_the_api_stream(daemon: Daemon) -> None:
    async def both() -> tuple[bytes, bytes, int]:
        async with daemon.h.http.get(
            f"{daemon.url}/v1/jobs/nightly/results", headers={"Authorization": f"Bearer {BILLING}"}
        ) as r:
            assert r.status == 200
            api = await r.read()
        http, _ = await _session(daemon, ADMIN)
        try:
            async with http.get(
                f"{daemon.url}/ui/jobs/nightly/results", params={"client": "billing"}
            ) as r:
                assert r.status == 200
                assert r.headers["Content-Disposition"].startswith("attachment")
                page = await r.read()
            async with http.get(
                f"{daemon.url}/ui/jobs/nightly/results",
                params={"client": "billing", "state": "nonsense"},
            ) as r:
                bad = r.status
        finally:
            await http.close()
        return api, page, bad

    api, page, bad = daemon.run(both())
    assert page == api and api.count(b"\n") == 4
    assert bad == 400


def test_job_cancel_refuses_forms_without_csrf_and_other_clients_jobs(daemon: Daemon) -> None:
    async def attempts() -> list[int]:
        statuses = []
        url = f"{daemon.url}/ui/jobs/backfill/cancel"
        admin, _ = await _session(daemon, ADMIN)
        search, search_csrf = await _session(daemon, SEARCH)
        try:
            for data in ({"confirm": "yes"}, {"confirm": "yes", "csrf": "forged"}):
                async with admin.post(url, params={"client": "billing"}, data=data) as r:
                    statuses.append(r.status)
            # Search names billing's job: its token's jobs are its own, and it has no backfill.
            async with search.post(
                url, params={"client": "billing"}, data={"confirm": "yes", "csrf": search_csrf}
            ) as r:
                statuses.append(r.status)
        finally:
            await admin.close()
            await search.close()
        return statuses

    assert daemon.run(attempts()) == [403, 403, 404]
    job = daemon.api("/v1/jobs/backfill", BILLING)
    assert (job["queued"], job["cancelled"]) == (2, 0)


def test_admin_cancels_a_clients_job_from_the_page_after_confirming(
    daemon: Daemon, browser: webdriver.Chrome
) -> None:
    login(browser, daemon, ADMIN)
    visit(browser, daemon.url + "/ui/jobs/backfill?client=billing")
    assert text_of(browser, "#job-client") == "billing"
    browser.find_element(By.CSS_SELECTOR, "form[action*='/cancel'] button").click()
    WebDriverWait(browser, 10).until(lambda drv: "Confirm cancel" in drv.title)
    assert text_of(browser, "#confirm-count") == "2"
    browser.save_screenshot(str(SHOTS / "confirm-cancel-job.png"))
    assert daemon.api("/v1/jobs/backfill", BILLING)["cancelled"] == 0
    browser.find_element(By.CSS_SELECTOR, "button.danger").click()
    WebDriverWait(browser, 10).until(lambda drv: drv.find_elements(By.ID, "action-result"))
    assert "Cancelled 2 queued tasks" in text_of(browser, "#action-result")
    after = daemon.api("/v1/jobs/backfill", BILLING)
    assert (after["queued"], after["cancelled"]) == (0, 2)
    states = daemon.run(daemon.h.rows("SELECT custom_id, state FROM tasks WHERE job = 'backfill'"))
    assert {r["custom_id"]: r["state"] for r in states} == {
        "bf-0": "cancelled",
        "bf-1": "cancelled",
    }
    audit = daemon.run(
        daemon.h.rows(
            "SELECT actor, client, requested, affected, detail FROM console_actions "
            "WHERE action = 'cancel_job'"
        )
    )
    assert [
        (a["actor"], a["client"], a["requested"], a["affected"], a["detail"]) for a in audit
    ] == [("admin", "billing", 2, 2, {"job": "backfill"})]
    # Nothing is left to cancel: the page says so instead of offering the form.
    visit(browser, daemon.url + "/ui/jobs/backfill?client=billing")
    assert not browser.find_elements(By.CSS_SELECTOR, "form[action*='/cancel']")
