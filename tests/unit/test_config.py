"""Settings: defaults, environment, and one clear line for a bad value."""

from __future__ import annotations

from typing import Any

import pytest

from batchd.cli import build_parser, main
from batchd.clients import parse_inline
from batchd.config import load_settings
from batchd.errors import ConfigError


def test_defaults_match_the_design() -> None:
    s = load_settings()
    assert (s.window_seconds, s.max_batch_items, s.max_attempts) == (900, 500, 3)
    assert (s.poll_interval_seconds, s.retry_backoff_seconds) == (60, 60)
    assert (s.http_host, s.http_port, s.failure_alert_ratio) == ("127.0.0.1", 8080, 0.03)
    assert s.daily_budget_usd is None and s.ingest_tokens is None


def test_environment_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BATCHD_WINDOW_SECONDS", "60")
    monkeypatch.setenv("BATCHD_INGEST_TOKENS", "a, b,,")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    s = load_settings()
    assert s.window_seconds == 60 and s.openai_api_key is not None
    assert s.openai_api_key.get_secret_value() == "sk-test"
    assert s.ingest_tokens is not None
    assert parse_inline(s.ingest_tokens.get_secret_value()) == [(None, "a"), (None, "b")]
    # Secrets never show in the settings' repr (a log line or a traceback).
    assert "sk-test" not in repr(s) and "a, b" not in repr(s)


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("BATCHD_WINDOW_SECONDS", "0"),
        ("BATCHD_WINDOW_SECONDS", "soon"),
        ("BATCHD_MAX_BATCH_ITEMS", "50001"),
        ("BATCHD_MAX_ATTEMPTS", "0"),
        ("BATCHD_COMPLETION_WINDOW", "48h"),
        ("BATCHD_DAILY_BUDGET_USD", "-1"),
        ("BATCHD_LOG_FORMAT", "xml"),
        ("BATCHD_HTTP_PORT", "70000"),
        ("BATCHD_MAX_METADATA_PAIRS", "17"),
        ("BATCHD_MAX_METADATA_KEY_CHARS", "65"),
        ("BATCHD_MAX_METADATA_VALUE_CHARS", "513"),
        ("BATCHD_MAX_CUSTOM_ID_CHARS", "513"),
        ("BATCHD_CUSTOM_ID_PATTERN", "[a-"),
        ("BATCHD_MAX_TASKS_PER_REQUEST", "0"),
        ("BATCHD_MAX_BODY_DEPTH", "1"),
        ("BATCHD_INGEST_TIMEOUT_SECONDS", "0"),
        ("BATCHD_CALLBACK_SECRET", "x" * 31),
        ("BATCHD_HTTP_MAX_CONNECTIONS", "0"),
        ("BATCHD_HTTP_HEADER_TIMEOUT_SECONDS", "0"),
        ("BATCHD_MAX_WAITERS", "-1"),
    ],
)
def test_bad_value_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, var: str, value: str
) -> None:
    monkeypatch.setenv(var, value)
    with pytest.raises(ConfigError) as caught:
        load_settings()
    message = str(caught.value)
    assert message.startswith(var + ":") and "\n" not in message


def test_log_level_and_format_ignore_case(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BATCHD_LOG_LEVEL", "INFO")
    monkeypatch.setenv("BATCHD_LOG_FORMAT", "Console")
    s = load_settings()
    assert (s.log_level, s.log_format) == ("info", "console")


def _option_help_lines(command: list[str]) -> list[str]:
    """Option lines of a subcommand's --help (an option's help may wrap)."""
    parser = build_parser()
    sub: Any = parser._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    target = sub[command[0]]
    for name in command[1:]:
        target = target._subparsers._group_actions[0].choices[name]
    return [a.help or "" for a in target._actions if a.option_strings and a.dest != "help"]


@pytest.mark.parametrize(
    "command",
    [["serve"], ["migrate"], ["submit"], ["report"], ["replay"], ["failed", "export"], ["demo"]],
)
def test_every_option_names_its_environment_variable(command: list[str]) -> None:
    helps = _option_help_lines(command)
    assert helps, "a command with no options would make this check empty"
    missing = [h for h in helps if "[env " not in h]
    assert not missing


def test_command_option_default_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BATCHD_REPORT_DAYS", "7")
    monkeypatch.setenv("BATCHD_REPORT_FORMAT", "csv")
    args = build_parser().parse_args(["report"])
    assert (args.days, args.format) == (7, "csv")
    assert build_parser().parse_args(["report", "--days", "2"]).days == 2


def test_ingest_limits_are_read_and_shown_in_help(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BATCHD_MAX_TASKS_PER_REQUEST", "7")
    monkeypatch.setenv("BATCHD_MAX_TASK_BODY_BYTES", "4096")
    monkeypatch.setenv("BATCHD_CUSTOM_ID_PATTERN", "[a-z]+")
    limits = load_settings().limits
    assert (limits.tasks_per_request, limits.task_body_bytes) == (7, 4096)
    assert limits.custom_id_regex.fullmatch("abc") and not limits.custom_id_regex.fullmatch("A")
    from batchd.cli import build_parser

    choices: Any = build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    serve = choices["serve"]
    text = serve.format_help()
    for var in (
        "BATCHD_MAX_REQUEST_BYTES",
        "BATCHD_MAX_TASKS_PER_REQUEST",
        "BATCHD_MAX_CUSTOM_ID_CHARS",
        "BATCHD_CUSTOM_ID_PATTERN",
        "BATCHD_MAX_TASK_BODY_BYTES",
        "BATCHD_MAX_BODY_DEPTH",
        "BATCHD_MAX_METADATA_PAIRS",
        "BATCHD_MAX_METADATA_KEY_CHARS",
        "BATCHD_MAX_METADATA_VALUE_CHARS",
        "BATCHD_INGEST_TIMEOUT_SECONDS",
        "BATCHD_MAX_PENDING_TASKS",
        "BATCHD_MAX_WAIT_SECONDS",
    ):
        assert var in text, var


def test_serve_takes_no_secret_on_the_command_line(capsys: pytest.CaptureFixture[str]) -> None:
    helps = " ".join(_option_help_lines(["serve"]))
    for variable in ("BATCHD_INGEST_TOKENS,", "BATCHD_CALLBACK_SECRET", "OPENAI_API_KEY,"):
        assert f"[env {variable}" not in helps
    for option in ("--ingest-tokens", "--callback-secret", "--openai-api-key"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["serve", option, "x"])
    capsys.readouterr()


@pytest.mark.parametrize(
    "url", ["postgresql://batchd:hunter2@db/batchd", "postgresql://db/batchd?password=hunter2"]
)
def test_database_url_with_a_password_is_refused_on_the_command_line(
    url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["serve", "--database-url", url]) == 2
    err = capsys.readouterr().err
    assert "BATCHD_DATABASE_URL" in err and "hunter2" not in err and err.count("\n") == 1
