"""Routing by urgency: lane, deadline, profile and canary decisions, table-driven."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from batchd.config import load_settings
from batchd.contract import parse_task
from batchd.domain import (
    RESUBMIT_MARGIN,
    SYNC_MARGIN,
    InvalidTask,
    budget_fit,
    canary_bucket,
    parse_client_profiles,
    place,
)
from batchd.errors import ConfigError

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
HOUR = timedelta(hours=1)


def _task(**fields: object) -> dict[str, object]:
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    return {"custom_id": "t-1", "body": body, **fields}


@pytest.mark.parametrize(
    ("fields", "share", "lane", "reason"),
    [
        ({}, 100, "batch", "batch"),
        ({"lane": "sync"}, 100, "sync", "requested"),
        ({"lane": "batch"}, 0, "batch", "batch"),  # an explicit batch lane ignores the canary
        ({}, 0, "sync", "canary"),
        ({"deadline": (NOW + 2 * HOUR).isoformat()}, 100, "sync", "deadline"),
        ({"deadline": (NOW + 24 * HOUR).isoformat()}, 100, "sync", "deadline"),  # + window
        ({"deadline": (NOW + 25 * HOUR).isoformat()}, 100, "batch", "batch"),
        ({"deadline": "2026-11-24T11:59:00Z"}, 100, "sync", "deadline"),
    ],
)
def test_place_chooses_the_lane(
    fields: dict[str, object], share: int, lane: str, reason: str
) -> None:
    placement = place(parse_task(_task(**fields), 0), NOW, 900, share)
    assert (placement.lane, placement.reason) == (lane, reason)


@pytest.mark.parametrize(
    ("profile", "backdate", "fallback", "action"),
    [
        (None, 0.0, None, None),
        ("24h", 0.0, NOW + 24 * HOUR - RESUBMIT_MARGIN, "resubmit"),
        ("6h", 0.0, NOW + 6 * HOUR - SYNC_MARGIN, "sync"),
        ("1h", 600.0, NOW + HOUR - SYNC_MARGIN, "sync"),
    ],
)
def test_profile_sets_window_and_fallback(
    profile: str | None, backdate: float, fallback: datetime | None, action: str | None
) -> None:
    meta = {"latency_profile": profile} if profile else None
    placement = place(parse_task(_task(metadata=meta), 0), NOW, 900, 100)
    assert placement.lane == "batch"
    assert placement.backdate_seconds == backdate
    assert (placement.fallback_at, placement.fallback_action) == (fallback, action)


@pytest.mark.parametrize(
    ("profile", "deadline", "fallback", "action"),
    [
        (None, NOW + 30 * HOUR, NOW + 30 * HOUR - SYNC_MARGIN, "sync"),
        # The 24h resubmission comes first; the sweep then sets the deadline's.
        ("24h", NOW + 30 * HOUR, NOW + 24 * HOUR - RESUBMIT_MARGIN, "resubmit"),
        ("24h", NOW + 24 * HOUR + timedelta(minutes=10), None, None),  # sync at ingest
        ("6h", NOW + 30 * HOUR, NOW + 6 * HOUR - SYNC_MARGIN, "sync"),
    ],
)
def test_the_earliest_limit_decides_the_fallback(
    profile: str | None, deadline: datetime, fallback: datetime | None, action: str | None
) -> None:
    meta = {"latency_profile": profile} if profile else None
    task = parse_task(_task(metadata=meta, deadline=deadline.isoformat()), 0)
    placement = place(task, NOW, 900, 100)
    assert (placement.fallback_at, placement.fallback_action) == (fallback, action)
    assert placement.lane == ("sync" if fallback is None else "batch")


@pytest.mark.parametrize(
    ("raw", "parsed"),
    [
        (None, {}),
        ("", {}),
        ("billing=6h", {"billing": "6h"}),
        (" billing = 1h , search=24h,", {"billing": "1h", "search": "24h"}),
    ],
)
def test_client_profiles_parse(raw: str | None, parsed: dict[str, str]) -> None:
    assert parse_client_profiles(raw) == parsed


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        ("billing", "must look like client=6h"),
        ("=6h", "must look like client=6h"),
        ("billing=2h", "one of 1h, 6h, 24h"),
        ("billing=1h,billing=6h", "listed twice"),
    ],
)
def test_bad_client_profiles_are_named(raw: str, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        parse_client_profiles(raw)


def test_a_bad_client_profile_stops_the_start_naming_the_variable() -> None:
    with pytest.raises(ConfigError, match=r"^BATCHD_CLIENT_PROFILES: "):
        load_settings(client_profiles="billing=fast")


D = Decimal


@pytest.mark.parametrize(
    ("spent", "estimates", "budget", "fit"),
    [
        (D("5"), [D("100")], None, 1),  # no budget: everything goes
        (D("0"), [], D("1"), 0),
        (D("0"), [D("0.4"), D("0.4"), D("0.4")], D("1"), 2),
        (D("0.2"), [D("0.4"), D("0.4")], D("1"), 2),  # exactly at the cap is allowed
        (D("0.3"), [D("0.4"), D("0.4")], D("1"), 1),
        (D("1"), [D("0.000001")], D("1"), 0),
        (D("0"), [D("2"), D("0.1")], D("1"), 0),  # in order: a small one never jumps the queue
    ],
)
def test_budget_fit_takes_calls_in_order_up_to_the_cap(
    spent: Decimal, estimates: list[Decimal], budget: Decimal | None, fit: int
) -> None:
    assert budget_fit(spent, estimates, budget) == fit


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"lane": "fast"}, "lane"),
        ({"deadline": "tomorrow"}, "deadline"),
        ({"deadline": "2026-11-24T12:00:00"}, "deadline"),  # no time zone
        ({"deadline": 1732363200}, "deadline"),
        ({"metadata": {"latency_profile": "2h"}}, "metadata.latency_profile"),
    ],
)
def test_bad_routing_fields_are_named(fields: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidTask) as caught:
        parse_task(_task(**fields), 0)
    assert caught.value.field == field


def test_canary_is_stable_and_near_its_share_on_10000_ids() -> None:
    ids = [f"task-{i}" for i in range(10_000)]
    buckets = [canary_bucket(i) for i in ids]
    assert buckets == [canary_bucket(i) for i in ids]
    task = parse_task(_task(), 0)
    for share in (10, 50, 90):
        in_batch = sum(
            place(replace(task, custom_id=i), NOW, 900, share).lane == "batch" for i in ids
        )
        # binomial(10000, p): 4 standard deviations is at most 200 tasks
        assert abs(in_batch - share * 100) <= 200, (share, in_batch)
