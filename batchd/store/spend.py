"""Money held and spent per day: the daily budget and each client's share."""

from __future__ import annotations

from datetime import date
from decimal import Decimal

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

# Settled cost, else the open reservation, of the day's batches and
# synchronous calls; the budget check and the budget gauge both read this.
DAY_SPEND_SQL = """
    (SELECT coalesce(sum(coalesce(cost_usd, reserved_usd)), 0) FROM batches
     WHERE spend_day = :day)
  + (SELECT coalesce(sum(coalesce(cost_usd, reserved_usd)), 0) FROM sync_spend
     WHERE spend_day = :day)"""


async def day_spend(conn: AsyncConnection, day: date) -> Decimal:
    """Spent plus reserved on ``day``, batches and synchronous calls alike."""
    row = await conn.execute(text(f"SELECT {DAY_SPEND_SQL}"), {"day": day})
    return Decimal(row.scalar_one())


async def client_day_spend(conn: AsyncConnection, day: date) -> dict[str, Decimal]:
    """Each client's spend and open reservations on ``day`` (client caps)."""
    rows = await conn.execute(
        text("""
        SELECT client, sum(reserved_usd + cost_usd) FROM client_spend
        WHERE spend_day = :day GROUP BY client"""),
        {"day": day},
    )
    return {client: Decimal(total) for client, total in rows}


async def reserve_client_spend(
    conn: AsyncConnection, day: date, batch_id: str, shares: dict[str, Decimal]
) -> None:
    """A batch's or sync claim's reservation, per client."""
    if not shares:
        return
    await conn.execute(
        text("""
        INSERT INTO client_spend (spend_day, client, batch_id, reserved_usd)
        SELECT :day, c, :bid, r FROM unnest(CAST(:c AS text[]), CAST(:r AS numeric[])) AS u(c, r)
        """),
        {"day": day, "bid": batch_id, "c": list(shares), "r": list(shares.values())},
    )


async def settle_client_spend(
    conn: AsyncConnection, batch_id: str, costs: dict[str, Decimal]
) -> None:
    """A routed batch: each client's reservation becomes its results' cost."""
    await conn.execute(
        text("""
        UPDATE client_spend s SET reserved_usd = 0, cost_usd = coalesce((
            SELECT u.cost FROM unnest(CAST(:c AS text[]), CAST(:v AS numeric[]))
                 AS u(client, cost) WHERE u.client = s.client), 0)
        WHERE s.batch_id = :bid"""),
        {"bid": batch_id, "c": list(costs), "v": list(costs.values())},
    )


async def settle_client_call(
    conn: AsyncConnection, claim_id: str, client: str, reserved: Decimal, paid: Decimal
) -> None:
    """One sync call of a claim answered: its reservation becomes its cost."""
    await conn.execute(
        text("""
        UPDATE client_spend SET reserved_usd = greatest(reserved_usd - :res, 0),
               cost_usd = cost_usd + :paid
        WHERE batch_id = :claim AND client = :client"""),
        {"claim": claim_id, "client": client, "res": reserved, "paid": paid},
    )


async def lock_budget(conn: AsyncConnection) -> None:
    """Serialise budget checks across replicas until the transaction ends."""
    await conn.execute(text("SELECT pg_advisory_xact_lock(hashtext('batchd.budget'))"))
