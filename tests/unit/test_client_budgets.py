"""BATCHD_CLIENT_BUDGETS: parsing, and which calls a client's cap lets through."""

from __future__ import annotations

from decimal import Decimal

import pytest

from batchd.config import load_settings
from batchd.domain import client_fit, parse_client_budgets
from batchd.errors import ConfigError


def test_pairs_parse_to_usd_a_day() -> None:
    assert parse_client_budgets("billing=50, search=5.25,") == {
        "billing": Decimal(50),
        "search": Decimal("5.25"),
    }
    assert parse_client_budgets(None) == {}


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        ("billing", "must look like client=50"),
        ("=5", "must look like client=50"),
        ("billing=lots", "must be a number of USD"),
        ("billing=-1", "0 or more"),
        ("billing=NaN", "0 or more"),
        ("billing=1,billing=2", "listed twice"),
    ],
)
def test_a_bad_pair_stops_the_start_naming_the_variable(raw: str, says: str) -> None:
    with pytest.raises(ConfigError, match=f"BATCHD_CLIENT_BUDGETS.*{says}"):
        load_settings(client_budgets=raw)


@pytest.mark.parametrize(
    ("estimates", "clients", "left", "kept"),
    [
        # billing has room for two of its three; search has no cap of its own.
        ([1, 1, 1, 1], ["billing", "search", "billing", "billing"], {"billing": 2}, [0, 1, 2]),
        # A big call past the cap waits; a later small one of the same client fits.
        ([5, 1], ["billing", "billing"], {"billing": 2}, [1]),
        # Anonymous tasks (no client) and clients with no cap always pass.
        ([9, 9], [None, "other"], {"billing": 0}, [0, 1]),
        ([1], ["billing"], {"billing": 0}, []),
    ],
)
def test_a_client_past_its_cap_waits_and_the_others_go_on(
    estimates: list[int], clients: list[str | None], left: dict[str, int], kept: list[int]
) -> None:
    assert (
        client_fit(
            [Decimal(e) for e in estimates], clients, {c: Decimal(v) for c, v in left.items()}
        )
        == kept
    )
