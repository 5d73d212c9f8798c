"""Command line: serve, migrate, submit, jobs, job, report, replay, failed export/dismiss,
prune, check, stats, demo.

Every option of serve/demo is a setting: ``--window-seconds`` is
BATCHD_WINDOW_SECONDS, and ``--help`` names the variable beside each option.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import re
import signal
import sys
from collections.abc import Callable, Coroutine
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, TypeVar

import orjson

from batchd import logs
from batchd.config import Settings, env_name, load_settings
from batchd.contract import job_name_problem
from batchd.errors import BatchdError, ConfigError

T = TypeVar("T")

# Secrets are never options: a command line shows in process listings and
# shell history. They come from the environment (or the tokens file) only.
_SECRET_SETTINGS = frozenset({"openai_api_key", "ingest_tokens", "admin_tokens", "callback_secret"})
_SETTING_OPTIONS = [
    name
    for name in Settings.model_fields
    if name not in _SECRET_SETTINGS and not name.endswith("_api_key")
]


def _add_setting_options(parser: argparse.ArgumentParser, names: list[str]) -> None:
    for name in names:
        field = Settings.model_fields[name]
        default = field.default if field.default is not None else "unset"
        parser.add_argument(
            f"--{name.replace('_', '-')}",
            dest=f"setting_{name}",
            default=None,
            metavar="V",
            help=f"{field.description or name} [env {env_name(name)}, default {default}]",
        )


def _env_option(
    parser: argparse.ArgumentParser, flag: str, env: str, help: str, **kwargs: Any
) -> None:
    """A command option whose default comes from ``env``, named in --help."""
    raw = os.environ.get(env)
    if raw is not None:
        if kwargs.get("action") == "store_true":
            kwargs["default"] = raw.strip().lower() in ("1", "true", "yes", "on")
        else:
            convert = kwargs.get("type", str)
            try:
                kwargs["default"] = convert(raw)
            except ValueError:
                parser.error(f"{env}: not a valid value ({raw!r})")
            kwargs.pop("required", None)
    shown = kwargs.get("default")
    suffix = f", default {shown}" if shown not in (None, False) else ""
    parser.add_argument(flag, help=f"{help} [env {env}{suffix}]", **kwargs)


def _env_list(env: str, convert: Callable[[str], T]) -> list[T] | None:
    raw = os.environ.get(env, "")
    try:
        return [convert(v.strip()) for v in raw.split(",") if v.strip()] or None
    except ValueError:
        raise ConfigError(f"{env}: not a comma-separated list ({raw!r})") from None


def _settings(args: argparse.Namespace) -> Settings:
    overrides = {
        k[len("setting_") :]: v
        for k, v in vars(args).items()
        if k.startswith("setting_") and v is not None
    }
    url = overrides.get("database_url")
    if isinstance(url, str) and _has_password(url):
        raise ConfigError(
            "--database-url carries a password, which the process list would "
            "show; set BATCHD_DATABASE_URL in the environment instead"
        )
    return load_settings(**overrides)


def _has_password(url: str) -> bool:
    """``user:secret@`` in the authority, or libpq's ``?password=``."""
    rest = url.partition("://")[2]
    userinfo, at, _ = rest.partition("/")[0].rpartition("@")
    return (bool(at) and ":" in userinfo) or "password=" in rest.partition("?")[2].lower()


def _run(coro: Coroutine[Any, Any, int]) -> int:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def _install_stop(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)


# ---------------------------------------------------------------- commands


async def _serve(settings: Settings) -> int:
    from batchd.service import Service, build_provider, migrate, open_engine

    logs.configure(settings.log_level, settings.log_format)
    provider = build_provider(settings)
    engine, url = await open_engine(settings)
    if settings.database_url is None:
        await migrate(url)  # the embedded database is ours to keep at head
    service = Service(settings, engine, provider)
    # Everything built so far lives as long as the process: move it out of the
    # collector's reach, so a full collection under load scans only what the
    # requests made (a tail-latency spike otherwise).
    gc.collect()
    gc.freeze()
    stop = asyncio.Event()
    _install_stop(stop)
    try:
        await service.run(stop)
    finally:
        await engine.dispose()
    return 0


async def _migrate(settings: Settings) -> int:
    from batchd.service import migrate
    from batchd.store.engine import resolve_url

    url = await resolve_url(settings.database_url, settings.data_dir)
    await migrate(url)
    print("schema is at head")
    return 0


async def _with_engine(settings: Settings) -> Any:
    from batchd.service import open_engine

    engine, _url = await open_engine(settings)
    return engine


async def _report(
    settings: Settings, day: date | None, days: int, fmt: str, client: str | None
) -> int:
    from batchd.report import Reporter, render_csv, render_table

    engine = await _with_engine(settings)
    try:
        rows = await Reporter(engine, settings.failure_alert_ratio).daily(day, days, client)
    finally:
        await engine.dispose()
    if fmt == "json":
        print(orjson.dumps(rows[0] if days == 1 else rows, option=orjson.OPT_INDENT_2).decode())
    elif fmt == "csv":
        print(render_csv(rows), end="")
    else:
        print(render_table(rows))
    return 0


async def _failed_export(settings: Settings, out: Path, client: str | None) -> int:
    from batchd.replay import Replayer

    engine = await _with_engine(settings)
    try:
        n = await Replayer(engine).export_failed(out, client)
    finally:
        await engine.dispose()
    print(f"wrote {n} failed task(s) to {out}")
    return 0


async def _failed_dismiss(
    settings: Settings,
    exported: Path | None,
    ids: list[str] | None,
    every: bool,
    client: str | None,
) -> int:
    from batchd.domain import LOCAL
    from batchd.replay import Replayer, read_failed_export

    # --custom-id names --client's tasks ('local' when none is named); an
    # export's lines name their own client (one from before clients: 'local').
    keys = [(client or LOCAL, cid) for cid in ids or []]
    if exported is not None:
        try:
            keys += [
                (str(r.get("client") or LOCAL), r["custom_id"])
                for r in read_failed_export(exported)
                if client is None or (r.get("client") or LOCAL) == client
            ]
        except (OSError, ValueError) as exc:
            raise BatchdError(str(exc)) from None
    engine = await _with_engine(settings)
    try:
        outcome = await Replayer(engine).dismiss_keys(None if every else keys, client)
    finally:
        await engine.dispose()
    print(f"dismissed {len(outcome.replayed)} task(s) from the manual queue")
    for cid, why in outcome.skipped.items():
        print(f"  skipped {cid}: {why}")
    return 0


def _retention(settings: Settings, engine: Any) -> Any:
    from batchd.report import Reporter
    from batchd.retention import Retention

    return Retention(
        engine,
        Reporter(engine, settings.failure_alert_ratio),
        days=settings.retention_days,
        batch_rows=settings.retention_batch_rows,
        interval=settings.retention_interval_seconds,
    )


async def _prune(settings: Settings, dry_run: bool) -> int:
    engine = await _with_engine(settings)
    try:
        retention = _retention(settings, engine)
        if dry_run:
            plan = await retention.plan()
            if plan.cutoff is None:
                print("nothing to prune: the database holds no history")
                return 0
            print(
                f"would delete rows finished before {plan.cutoff.isoformat()} "
                f"(BATCHD_RETENTION_DAYS={settings.retention_days}); nothing was changed"
            )
            for what, n in plan.due.items():
                print(f"  {what}: {n}")
            return 0
        pruned = await retention.prune()
    finally:
        await engine.dispose()
    print(f"pruned {pruned.total} row(s) (BATCHD_RETENTION_DAYS={settings.retention_days})")
    for table, n in pruned.rows.items():
        print(f"  {table}: {n}")
    return 0


async def _check(settings: Settings, as_json: bool) -> int:
    from batchd.check import check

    engine = await _with_engine(settings)
    try:
        breaches = await check(engine, retention_days=settings.retention_days)
    finally:
        await engine.dispose()
    if as_json:
        print(
            orjson.dumps(
                {"ok": not breaches, "breaches": [b.as_json() for b in breaches]},
                option=orjson.OPT_INDENT_2,
            ).decode()
        )
    elif breaches:
        for b in breaches:
            print(b.line())
    else:
        print("all invariants hold")
    return 1 if breaches else 0


async def _stats(settings: Settings, as_json: bool) -> int:
    from batchd.stats import collect, render

    engine = await _with_engine(settings)
    try:
        stats = await collect(engine)
    finally:
        await engine.dispose()
    if as_json:
        print(orjson.dumps(stats, option=orjson.OPT_INDENT_2).decode())
    else:
        print(render(stats))
    return 0


async def _replay(
    settings: Settings, failed: Path, out: Path | None, submit: bool, client: str | None
) -> int:
    from batchd.domain import LOCAL
    from batchd.replay import Replayer, read_failed_export, write_input_file

    try:
        # A line names its client (an export from before clients: 'local').
        rows = [
            r
            for r in read_failed_export(failed)
            if client is None or (r.get("client") or LOCAL) == client
        ]
    except (OSError, ValueError) as exc:
        raise BatchdError(str(exc)) from None
    if out is not None:
        n = write_input_file(rows, out)
        print(f"wrote {n} request line(s) to {out}; inspect it, then replay with --submit")
    if submit:
        engine = await _with_engine(settings)
        try:
            outcome = await Replayer(engine).replay_keys(
                [(str(r.get("client") or LOCAL), r["custom_id"]) for r in rows], client
            )
        finally:
            await engine.dispose()
        print(f"re-queued {len(outcome.replayed)} task(s)")
        for cid, why in outcome.skipped.items():
            print(f"  skipped {cid}: {why}")
    return 0


def default_job_name(path: Path, now: datetime | None = None) -> str:
    """The file's stem and the UTC time, in the job alphabet: tasks.jsonl ->
    tasks-20261206T021500Z."""
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%SZ")
    stem = re.sub(r"[^A-Za-z0-9._:@+=~/-]+", "-", path.stem).strip("-") or "job"
    return f"{stem[: 128 - len(stamp) - 1]}-{stamp}"


async def _submit(
    path: Path,
    url: str,
    token: str | None,
    chunk: int,
    wait: float | None,
    job: str | None,
    out: Path | None,
    concurrency: int,
) -> int:
    """Bulk ingest into one job with a progress bar (on a terminal) and a
    summary line; then, with --wait, the job's bar and, with --out, its results."""
    import time

    import aiohttp
    from tqdm import tqdm

    from batchd.client import (
        BatchdClient,
        BatchdClientError,
        FileError,
        JobNotFinished,
        SubmitError,
        file_chunks,
        line_of_task,
        scan_file_jobs,
    )
    from batchd.progress import JobBar, job_line

    try:
        total, own_job = scan_file_jobs(path)
    except OSError as exc:
        raise BatchdError(f"cannot read {path}: {exc.strerror}") from None
    except FileError as exc:
        raise BatchdError(f"{exc.message}; nothing was sent") from None
    name = job or default_job_name(path)
    started = time.monotonic()
    async with BatchdClient(url, token) as client:
        try:
            with tqdm(
                total=total,
                unit="task",
                desc="submitted",
                file=sys.stderr,
                disable=None,
                dynamic_ncols=True,
            ) as bar:
                summary = await client.submit_lines(
                    file_chunks(path, chunk, name, own_job=own_job),
                    concurrency=concurrency,
                    progress=lambda n: bar.update(n - bar.n),
                )
        except SubmitError as exc:
            line = line_of_task(path, exc.task_index) if exc.task_index is not None else None
            where = f"{path}:{line}" if line else str(path)
            print(
                f"batchd submit: {where}: refused ({exc.status} {exc.code}): {exc.message}\n"
                f"{exc.stored} task(s) were stored; fix the line and send the file "
                "again with the same --job (stored tasks count as duplicates)",
                file=sys.stderr,
            )
            return 1
        except (aiohttp.ClientError, OSError) as exc:
            raise BatchdError(f"cannot reach batchd at {url}: {exc}") from None
        elapsed = time.monotonic() - started
        print(
            f"submitted {summary.tasks} task(s) from {path} as job {name} in "
            f"{summary.requests} request(s), {elapsed:.1f}s: {summary.accepted} accepted, "
            f"{summary.duplicates} duplicate(s), {summary.retries} request(s) retried"
        )
        if wait is None:
            return 0
        bar = JobBar(name)
        try:
            # Duplicates stay in the job they were first sent with. With --out
            # the results are written as they finish, so at the end only the
            # last ones are left to read.
            if out is None:
                view = await client.wait_job(
                    name, timeout=wait or None, progress=bar, min_tasks=summary.accepted
                )
            else:
                view, lines = await client.wait_job_results(
                    name, out, timeout=wait or None, progress=bar, min_tasks=summary.accepted
                )
        except JobNotFinished as exc:
            bar.close()
            print(f"batchd submit: {exc}\n{job_line(exc.job)}", file=sys.stderr)
            return 1
        except BatchdClientError as exc:
            bar.close()
            raise BatchdError(str(exc)) from None
        bar.close()
        print(job_line(view) + (" (see GET /v1/failed)" if view["failed"] else ""))
        if out is not None:
            print(f"wrote {lines} result(s) to {out}")
        return 1 if view["failed"] else 0


async def _jobs(url: str, token: str | None, limit: int) -> int:
    from batchd.client import BatchdClient, BatchdClientError
    from batchd.progress import job_line

    async with BatchdClient(url, token) as api:
        try:
            shown = 0
            async for view in api.jobs(min(limit, 1000)):
                print(job_line(view) + ("" if view["finished_at"] else " [open]"))
                shown += 1
                if shown >= limit:
                    break
        except BatchdClientError as exc:
            raise BatchdError(str(exc)) from None
    return 0


async def _job(
    url: str, token: str | None, action: str, name: str, out: Path | None, state: str | None
) -> int:
    from batchd.client import BatchdClient, BatchdClientError
    from batchd.progress import job_line

    async with BatchdClient(url, token) as api:
        try:
            if action == "show":
                print(orjson.dumps(await api.get_job(name), option=orjson.OPT_INDENT_2).decode())
            elif action == "cancel":
                view = await api.cancel_job(name)
                print(
                    f"cancelled {view['cancelled_now']} queued task(s); "
                    f"{view['submitted']} at the provider will finish\n{job_line(view)}"
                )
            else:
                assert out is not None
                lines = await api.write_job_results(name, out, state=state)
                print(f"wrote {lines} result(s) of job {name} to {out}")
        except BatchdClientError as exc:
            raise BatchdError(str(exc)) from None
    return 0


async def _callbacks_failed(url: str, token: str | None, client: str | None) -> int:
    from batchd.client import BatchdClient, BatchdClientError

    async with BatchdClient(url, token) as api:
        try:
            async for row in api.failed_callbacks(client):
                print(orjson.dumps(row).decode())
        except BatchdClientError as exc:
            raise BatchdError(str(exc)) from None
    return 0


async def _callbacks_replay(
    url: str, token: str | None, ids: list[int] | None, custom_ids: list[str] | None
) -> int:
    from batchd.client import BatchdClient, BatchdClientError

    async with BatchdClient(url, token) as api:
        try:
            replayed = await api.replay_callbacks(ids, custom_ids)
        except BatchdClientError as exc:
            raise BatchdError(str(exc)) from None
    print(f"{len(replayed)} delivery(ies) due again: {', '.join(map(str, replayed)) or '-'}")
    return 0


async def _demo(settings: Settings, tasks: int, seconds: float, providers: str) -> int:
    from batchd.demo import DEMO_PROVIDERS, run_demo

    names = [p.strip() for p in providers.split(",") if p.strip()]
    unknown = sorted(set(names) - set(DEMO_PROVIDERS))
    if unknown or not names:
        raise ConfigError(
            f"--providers: {', '.join(unknown) or 'none given'}; choose from "
            f"{', '.join(DEMO_PROVIDERS)}"
        )
    logs.configure(settings.log_level, settings.log_format)
    return await run_demo(settings, tasks=tasks, give_up_after=seconds, providers=names)


# ------------------------------------------------------------------ parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="batchd",
        description="Windowed batching daemon for the batch APIs of OpenAI, "
        "Anthropic, Gemini, Azure OpenAI and OpenAI-compatible providers.",
        epilog="Provider keys are read from the environment only (OPENAI_API_KEY, "
        "ANTHROPIC_API_KEY, GEMINI_API_KEY, AZURE_OPENAI_API_KEY, "
        "BATCHD_PROVIDER_<NAME>_API_KEY; never options, so they stay out of process "
        "listings).",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    # No abbreviations: `--ingest-tokens x` must be an error, not the
    # tokens file option it abbreviates.
    serve = sub.add_parser(
        "serve",
        help="run API, scheduler, poller and router",
        allow_abbrev=False,
        epilog="Provider keys, tokens and the callback secret come from the "
        "environment only (OPENAI_API_KEY, ANTHROPIC_API_KEY, "
        "GEMINI_API_KEY, AZURE_OPENAI_API_KEY, "
        "BATCHD_PROVIDER_<NAME>_API_KEY, BATCHD_INGEST_TOKENS or "
        "BATCHD_INGEST_TOKENS_FILE, BATCHD_ADMIN_TOKENS, "
        "BATCHD_CALLBACK_SECRET).",
    )
    _add_setting_options(serve, _SETTING_OPTIONS)

    migrate = sub.add_parser("migrate", help="bring the schema to head (alembic upgrade head)")
    _add_setting_options(migrate, ["database_url", "data_dir"])

    submit = sub.add_parser("submit", help="bulk-ingest a JSONL file of tasks through the API")
    submit.add_argument("file", type=Path)
    submit.add_argument(
        "--url", default=None, help="API base URL [env BATCHD_URL, default http://127.0.0.1:8080]"
    )
    submit.add_argument("--token", default=None, help="bearer token [env BATCHD_TOKEN]")
    _env_option(
        submit, "--chunk", "BATCHD_SUBMIT_CHUNK", "tasks per request", type=int, default=1000
    )
    _env_option(
        submit,
        "--wait",
        "BATCHD_SUBMIT_WAIT",
        "then wait up to SECONDS until every "
        "task of the job finished (0: no limit), with one progress bar fed by one job "
        "status request every 0.25 s; exit 1 if any failed",
        type=float,
        metavar="SECONDS",
    )
    _env_option(
        submit,
        "--job",
        "BATCHD_SUBMIT_JOB",
        "the job the file's tasks go into (default: the file's stem and the UTC time)",
        metavar="NAME",
    )
    _env_option(
        submit,
        "--out",
        "BATCHD_SUBMIT_OUT",
        "with --wait: write the job's results "
        "here as JSONL (in task order, as they finish; the file appears complete when "
        "the job finished)",
        type=Path,
        metavar="RESULTS.jsonl",
    )
    _env_option(
        submit,
        "--concurrency",
        "BATCHD_SUBMIT_CONCURRENCY",
        "requests in flight",
        type=int,
        default=4,
    )

    jobs = sub.add_parser("jobs", help="your jobs, newest first")
    _env_option(jobs, "--limit", "BATCHD_JOBS_LIMIT", "how many", type=int, default=20)
    job = sub.add_parser(
        "job", help="one job: `job NAME`, `job cancel NAME`, `job results NAME --out FILE`"
    )
    job.add_argument("words", nargs="+", metavar="[cancel|results] NAME")
    job.add_argument(
        "--out", type=Path, default=None, help="for `job results`: the JSONL file to write"
    )
    job.add_argument(
        "--state",
        choices=("succeeded", "failed", "cancelled"),
        default=None,
        help="for `job results`: only tasks in this state",
    )
    for p in (jobs, job):
        p.add_argument(
            "--url",
            default=None,
            help="API base URL [env BATCHD_URL, default http://127.0.0.1:8080]",
        )
        p.add_argument("--token", default=None, help="bearer token [env BATCHD_TOKEN]")

    report = sub.add_parser("report", help="the daily report")
    _env_option(
        report,
        "--date",
        "BATCHD_REPORT_DATE",
        "last UTC day shown (YYYY-MM-DD, default today)",
        type=date.fromisoformat,
    )
    _env_option(
        report, "--days", "BATCHD_REPORT_DAYS", "how many days up to --date", type=int, default=1
    )
    _env_option(
        report,
        "--format",
        "BATCHD_REPORT_FORMAT",
        "output format",
        choices=("table", "json", "csv"),
        default="table",
    )
    _env_option(
        report, "--client", "BATCHD_REPORT_CLIENT", "one client's numbers (default: every client's)"
    )
    _add_setting_options(report, ["database_url", "data_dir", "failure_alert_ratio"])

    replay = sub.add_parser("replay", help="turn a failed export into a new input file or queue")
    _env_option(
        replay,
        "--failed",
        "BATCHD_REPLAY_FAILED",
        "a `failed export` file",
        type=Path,
        required=True,
    )
    _env_option(replay, "--out", "BATCHD_REPLAY_OUT", "write a provider input file", type=Path)
    _env_option(
        replay,
        "--submit",
        "BATCHD_REPLAY_SUBMIT",
        "re-queue the tasks instead",
        action="store_true",
    )
    _env_option(
        replay,
        "--client",
        "BATCHD_REPLAY_CLIENT",
        "only this client's lines of the file (default: each line's own client)",
    )
    _add_setting_options(replay, ["database_url", "data_dir"])

    failed = sub.add_parser("failed", help="the manual queue")
    failed_sub = failed.add_subparsers(dest="failed_command", required=True)
    export = failed_sub.add_parser("export", help="write failed tasks as JSONL")
    _env_option(
        export, "--out", "BATCHD_FAILED_OUT", "where to write the JSONL", type=Path, required=True
    )
    _env_option(
        export,
        "--client",
        "BATCHD_FAILED_CLIENT",
        "only this client's failed tasks (default: every client's)",
    )
    _add_setting_options(export, ["database_url", "data_dir"])
    dismiss = failed_sub.add_parser(
        "dismiss", help="take failed tasks out of the manual queue for good (export first)"
    )
    _env_option(
        dismiss,
        "--exported",
        "BATCHD_FAILED_DISMISS_EXPORTED",
        "dismiss the tasks of this `failed export` file",
        type=Path,
    )
    dismiss.add_argument(
        "--custom-id",
        action="append",
        dest="custom_ids",
        metavar="ID",
        help="a failed task of --client, repeatable",
    )
    _env_option(
        dismiss,
        "--all",
        "BATCHD_FAILED_DISMISS_ALL",
        "every failed task (--client's, or every client's)",
        action="store_true",
    )
    _env_option(
        dismiss,
        "--client",
        "BATCHD_FAILED_DISMISS_CLIENT",
        "whose tasks: --custom-id names this client's ('local' when none is named); "
        "narrows --exported and --all to it",
    )
    _add_setting_options(dismiss, ["database_url", "data_dir"])

    prune = sub.add_parser(
        "prune", help="roll up closed days and delete history past BATCHD_RETENTION_DAYS, once"
    )
    _env_option(
        prune,
        "--dry-run",
        "BATCHD_PRUNE_DRY_RUN",
        "count what would go; change nothing",
        action="store_true",
    )
    _add_setting_options(
        prune,
        [
            "database_url",
            "data_dir",
            "retention_days",
            "retention_batch_rows",
            "failure_alert_ratio",
        ],
    )

    check = sub.add_parser(
        "check", help="verify the database's invariants; exit 1 naming each breach"
    )
    _env_option(check, "--json", "BATCHD_CHECK_JSON", "print JSON", action="store_true")
    _add_setting_options(check, ["database_url", "data_dir", "retention_days"])

    stats = sub.add_parser("stats", help="table sizes, tasks by state, oldest rows, bytes a task")
    _env_option(stats, "--json", "BATCHD_STATS_JSON", "print JSON", action="store_true")
    _add_setting_options(stats, ["database_url", "data_dir"])

    callbacks = sub.add_parser("callbacks", help="result deliveries that used up their attempts")
    callbacks_sub = callbacks.add_subparsers(dest="callbacks_command", required=True)
    listing = callbacks_sub.add_parser("failed", help="list failed deliveries as JSONL")
    _env_option(listing, "--client", "BATCHD_CALLBACKS_CLIENT", "only this client's")
    again = callbacks_sub.add_parser("replay", help="deliver failed callbacks again")
    again.add_argument(
        "--id",
        type=int,
        action="append",
        dest="ids",
        metavar="N",
        help="a delivery id, repeatable [env BATCHD_CALLBACKS_REPLAY_IDS, comma-separated]",
    )
    again.add_argument(
        "--custom-id",
        action="append",
        dest="custom_ids",
        metavar="ID",
        help="every failed delivery of this task, repeatable "
        "[env BATCHD_CALLBACKS_REPLAY_CUSTOM_IDS, comma-separated]",
    )
    _env_option(
        again, "--all", "BATCHD_CALLBACKS_REPLAY_ALL", "every failed delivery", action="store_true"
    )
    for p in (listing, again):
        p.add_argument(
            "--url",
            default=None,
            help="API base URL [env BATCHD_URL, default http://127.0.0.1:8080]",
        )
        p.add_argument("--token", default=None, help="bearer token [env BATCHD_TOKEN]")

    demo = sub.add_parser(
        "demo", help="serve + bundled emulator + generated load, then report", allow_abbrev=False
    )
    _env_option(demo, "--tasks", "BATCHD_DEMO_TASKS", "tasks to generate", type=int, default=2000)
    _env_option(
        demo,
        "--timeout",
        "BATCHD_DEMO_TIMEOUT",
        "give up after this many s",
        type=float,
        default=300,
    )
    _env_option(
        demo,
        "--providers",
        "BATCHD_DEMO_PROVIDERS",
        "comma-separated providers to load through their emulators (openai, anthropic, gemini)",
        default="openai",
    )
    _add_setting_options(demo, _SETTING_OPTIONS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "submit":
            if args.chunk < 1 or args.concurrency < 1:
                raise ConfigError("--chunk and --concurrency must be at least 1")
            if args.out is not None and args.wait is None:
                raise ConfigError(
                    "--out needs --wait: results are written while waiting "
                    "for the job (or use `batchd job results NAME --out FILE`)"
                )
            if args.job is not None and job_name_problem(args.job):
                raise ConfigError(f"--job {job_name_problem(args.job)}")
            url = args.url or os.environ.get("BATCHD_URL", "http://127.0.0.1:8080")
            return _run(
                _submit(
                    args.file,
                    url,
                    args.token or os.environ.get("BATCHD_TOKEN"),
                    args.chunk,
                    args.wait,
                    args.job,
                    args.out,
                    args.concurrency,
                )
            )
        if args.command in ("jobs", "job"):
            url = args.url or os.environ.get("BATCHD_URL", "http://127.0.0.1:8080")
            token = args.token or os.environ.get("BATCHD_TOKEN")
            if args.command == "jobs":
                return _run(_jobs(url, token, max(1, args.limit)))
            words = args.words
            action = words[0] if len(words) == 2 and words[0] in ("cancel", "results") else "show"
            if len(words) != (1 if action == "show" else 2):
                raise ConfigError(
                    "use `batchd job NAME`, `batchd job cancel NAME` or "
                    "`batchd job results NAME --out FILE`"
                )
            if action == "results" and args.out is None:
                raise ConfigError("job results needs --out FILE")
            return _run(_job(url, token, action, words[-1], args.out, args.state))
        if args.command == "callbacks":
            url = args.url or os.environ.get("BATCHD_URL", "http://127.0.0.1:8080")
            token = args.token or os.environ.get("BATCHD_TOKEN")
            if args.callbacks_command == "failed":
                return _run(_callbacks_failed(url, token, args.client))
            ids = args.ids or _env_list("BATCHD_CALLBACKS_REPLAY_IDS", int)
            custom_ids = args.custom_ids or _env_list("BATCHD_CALLBACKS_REPLAY_CUSTOM_IDS", str)
            if not (ids or custom_ids or args.all):
                raise ConfigError("callbacks replay needs --id N, --custom-id ID or --all")
            return _run(_callbacks_replay(url, token, ids, custom_ids))
        settings = _settings(args)
        if args.command == "serve":
            return _run(_serve(settings))
        if args.command == "migrate":
            return _run(_migrate(settings))
        if args.command == "report":
            if args.days < 1:
                raise ConfigError("--days must be at least 1")
            return _run(_report(settings, args.date, args.days, args.format, args.client))
        if args.command == "replay":
            if args.out is None and not args.submit:
                raise ConfigError("replay needs --out FILE, --submit, or both")
            return _run(_replay(settings, args.failed, args.out, args.submit, args.client))
        if args.command == "failed" and args.failed_command == "dismiss":
            if not (args.exported or args.custom_ids or args.all):
                raise ConfigError("failed dismiss needs --exported FILE, --custom-id ID or --all")
            return _run(
                _failed_dismiss(settings, args.exported, args.custom_ids, args.all, args.client)
            )
        if args.command == "failed":
            return _run(_failed_export(settings, args.out, args.client))
        if args.command == "prune":
            return _run(_prune(settings, args.dry_run))
        if args.command == "check":
            return _run(_check(settings, args.json))
        if args.command == "stats":
            return _run(_stats(settings, args.json))
        if args.command == "demo":
            if args.setting_log_level is None and "BATCHD_LOG_LEVEL" not in os.environ:
                # The demo prints its own progress and report; keep logs to problems.
                settings = settings.model_copy(
                    update={"log_level": "warning", "log_format": "console"}
                )
            return _run(_demo(settings, args.tasks, args.timeout, args.providers))
    except BatchdError as exc:
        print(f"batchd: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 2
