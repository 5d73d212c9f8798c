"""`batchd submit`'s job: its default name, and the job put on each line."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import orjson

from batchd.cli import default_job_name
from batchd.client import file_chunks, scan_file_jobs
from batchd.contract import job_name_problem

NOW = datetime(2026, 12, 6, 2, 15, tzinfo=UTC)


def test_the_default_job_is_the_file_stem_and_the_utc_time() -> None:
    assert default_job_name(Path("/data/tasks.jsonl"), NOW) == "tasks-20261206T021500Z"
    odd = default_job_name(Path("my evals (v2)!.jsonl"), NOW)
    assert odd == "my-evals-v2-20261206T021500Z" and job_name_problem(odd) is None
    long = default_job_name(Path("x" * 300 + ".jsonl"), NOW)
    assert len(long) == 128 and job_name_problem(long) is None
    assert default_job_name(Path("!!!.jsonl"), NOW) == "job-20261206T021500Z"


def test_each_line_gets_the_job_unless_it_names_its_own(tmp_path: Path) -> None:
    plain = tmp_path / "plain.jsonl"
    plain.write_bytes(
        b'{"custom_id": "a", "body": {}}\n\n  {"custom_id":"b","body":{}}  \n'
        b'{"custom_id":"c","body":{}}\n'
    )
    count, own = scan_file_jobs(plain)
    assert (count, own) == (3, False)
    chunks = list(file_chunks(plain, 2, "run-1", own_job=own))
    assert [len(c) for c in chunks] == [2, 1]
    docs = [orjson.loads(line) for c in chunks for line in c]
    assert [(d["custom_id"], d["job"]) for d in docs] == [
        ("a", "run-1"),
        ("b", "run-1"),
        ("c", "run-1"),
    ]

    mixed = tmp_path / "mixed.jsonl"
    mixed.write_bytes(b'{"custom_id": "a", "job": "mine"}\n{"custom_id": "b"}\n')
    count, own = scan_file_jobs(mixed)
    assert (count, own) == (2, True)
    docs = [orjson.loads(line) for c in file_chunks(mixed, 10, "run-2", own_job=own) for line in c]
    assert [d["job"] for d in docs] == ["mine", "run-2"]
    untouched = [orjson.loads(line) for c in file_chunks(mixed, 10) for line in c]
    assert "job" not in untouched[1]
