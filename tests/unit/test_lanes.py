"""Routing by urgency: lane, deadline, profile and canary decisions, table-driven."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from batchd.domain import SYNC_MARGIN, InvalidTask, canary_bucket, parse_task, place

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
HOUR = timedelta(hours=1)


def _task(**fields: object) -> dict[str, object]:
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    return {"custom_id": "t-1", "body": body, **fields}


@pytest.mark.parametrize(("fields", "share", "lane", "reason"), [
    ({}, 100, "batch", "batch"),
    ({"lane": "sync"}, 100, "sync", "requested"),
    ({"lane": "batch"}, 0, "batch", "batch"),  # an explicit batch lane ignores the canary
    ({}, 0, "sync", "canary"),
    ({"deadline": (NOW + 2 * HOUR).isoformat()}, 100, "sync", "deadline"),
    ({"deadline": (NOW + 24 * HOUR).isoformat()}, 100, "sync", "deadline"),  # + window
    ({"deadline": (NOW + 25 * HOUR).isoformat()}, 100, "batch", "batch"),
    ({"deadline": "2026-11-24T11:59:00Z"}, 100, "sync", "deadline"),
])
def test_place_chooses_the_lane(fields: dict[str, object], share: int, lane: str,
                                reason: str) -> None:
    placement = place(parse_task(_task(**fields), 0), NOW, 900, share)
    assert (placement.lane, placement.reason) == (lane, reason)


@pytest.mark.parametrize(("profile", "backdate", "fallback"), [
    (None, 0.0, None),
    ("24h", 0.0, None),
    ("6h", 0.0, NOW + 6 * HOUR - SYNC_MARGIN),
    ("1h", 600.0, NOW + HOUR - SYNC_MARGIN),
])
def test_profile_sets_window_and_fallback(profile: str | None, backdate: float,
                                          fallback: datetime | None) -> None:
    meta = {"latency_profile": profile} if profile else None
    placement = place(parse_task(_task(metadata=meta), 0), NOW, 900, 100)
    assert placement.lane == "batch"
    assert placement.backdate_seconds == backdate
    assert placement.fallback_at == fallback


def test_deadline_far_enough_for_a_batch_still_gets_a_fallback() -> None:
    deadline = NOW + 30 * HOUR
    task = parse_task(_task(deadline=deadline.isoformat()), 0)
    assert place(task, NOW, 900, 100).fallback_at == deadline - SYNC_MARGIN


@pytest.mark.parametrize(("fields", "field"), [
    ({"lane": "fast"}, "lane"),
    ({"deadline": "tomorrow"}, "deadline"),
    ({"deadline": "2026-11-24T12:00:00"}, "deadline"),  # no time zone
    ({"deadline": 1732363200}, "deadline"),
    ({"metadata": {"latency_profile": "2h"}}, "metadata.latency_profile"),
])
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
            place(replace(task, custom_id=i), NOW, 900, share).lane == "batch" for i in ids)
        # binomial(10000, p): 4 standard deviations is at most 200 tasks
        assert abs(in_batch - share * 100) <= 200, (share, in_batch)
