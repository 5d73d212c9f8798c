"""One JSONL reader: objects with their line numbers, blank lines skipped,
a bad line named by file and number wherever batchd reads such a file."""

from __future__ import annotations

from pathlib import Path

import pytest

from batchd import jsonl
from batchd.client import FileError, scan_file_jobs
from batchd.replay import read_failed_export


def test_objects_come_with_their_line_numbers_and_a_bad_line_is_named(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_bytes(b'{"a": 1}\n\n  \n{"b": 2}\n')
    assert list(jsonl.objects(path)) == [(1, {"a": 1}), (4, {"b": 2})]
    for bad, says in ((b"{nope\n", "not valid JSON"), (b"[1, 2]\n", "not a JSON object")):
        path.write_bytes(b'{"a": 1}\n' + bad)
        with pytest.raises(jsonl.JsonlError) as caught:
            list(jsonl.objects(path))
        assert caught.value.line == 2
        assert str(caught.value).startswith(f"{path}:2: {says}")


def test_task_files_and_failed_exports_report_the_line(tmp_path: Path) -> None:
    path = tmp_path / "tasks.jsonl"
    path.write_bytes(b'{"custom_id": "a"}\n"just a string"\n')
    with pytest.raises(FileError) as refused:
        scan_file_jobs(path)
    assert f"{path}:2: not a JSON object" in refused.value.message
    with pytest.raises(ValueError, match=r"tasks.jsonl:2: not a JSON object"):
        list(read_failed_export(path))
    path.write_bytes(b'{"custom_id": "a"}\n{"body": {}}\n')
    with pytest.raises(ValueError, match=r":2: has no custom_id; is this a failed export\?"):
        list(read_failed_export(path))
