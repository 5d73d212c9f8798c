"""A job's progress on a terminal: one tqdm bar fed by the job's status
(`batchd submit --wait`, `batchd demo`), and its one-line summary."""

from __future__ import annotations

import sys
from typing import Any

from tqdm import tqdm


class JobBar:
    """One progress bar for a job, fed by its status: finished tasks of all,
    with succeeded, failed and cost so far beside tqdm's rate and ETA."""

    def __init__(self, job: str) -> None:
        self.bar = tqdm(
            total=0, unit="task", desc=job, file=sys.stderr, disable=None, dynamic_ncols=True
        )

    def __call__(self, view: dict[str, Any]) -> None:
        done = view["succeeded"] + view["failed"] + view["cancelled"]
        if self.bar.total != view["tasks"]:
            self.bar.total = view["tasks"]
            self.bar.refresh()
        self.bar.set_postfix_str(
            f"ok={view['succeeded']} failed={view['failed']}"
            + (f" cancelled={view['cancelled']}" if view["cancelled"] else "")
            + f" ${view['spend_usd']}",
            refresh=False,
        )
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        self.bar.close()


def job_line(view: dict[str, Any]) -> str:
    return (
        f"job {view['job']}: {view['tasks']} task(s): {view['succeeded']} succeeded, "
        f"{view['failed']} failed, {view['cancelled']} cancelled, {view['queued']} queued, "
        f"{view['submitted']} at the provider; spend ${view['spend_usd']} (synchronously "
        f"${view['sync_equivalent_usd']}, saved ${view['savings_usd']})"
    )
