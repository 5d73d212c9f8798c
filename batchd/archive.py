"""The audit archive: every input, output and error file of every batch.

Layout: ``<root>/<YYYY-MM-DD>/<batch_id>/{input,ids,output,error}.jsonl.gz``
plus a ``manifest.json`` per batch naming the provider's ids and each file's
SHA-256 of the uncompressed bytes. ``ids`` maps the input's line ids (the
custom_ids the provider saw and answers with) to the callers' tasks: one JSON
array a line, ``[line_id, client, custom_id]``. Files are written to a temporary name,
fsynced and renamed (and the folder fsynced), so a crash never leaves a
half-written file under a real name; the spool copy is removed only after
that. Spool files a crash or a failed write left behind are archived by the
service's periodic sweep. Replicas may share the archive (a ReadWriteMany
volume): temporary names are unique per writer and the manifest is updated
under a file lock, so two writers of the same batch never lose an entry.
"""

from __future__ import annotations

import asyncio
import fcntl
import gzip
import hashlib
import json
import os
import shutil
import time
import uuid
from datetime import date, timedelta
from pathlib import Path
from typing import Any

_CHUNK = 1 << 20


class Archive:
    def __init__(self, root: Path, spool: Path) -> None:
        self.root = root
        self.spool = spool

    def spool_path(self, batch_id: str, kind: str) -> Path:
        self.spool.mkdir(parents=True, exist_ok=True)
        return self.spool / f"{batch_id}.{kind}.jsonl"

    def batch_dir(self, day: date, batch_id: str) -> Path:
        return self.root / day.isoformat() / batch_id

    async def keep(
        self, src: Path, day: date, batch_id: str, kind: str, info: dict[str, Any] | None = None
    ) -> Path:
        """Compress ``src`` into the archive and record it in the manifest."""
        return await asyncio.to_thread(self._keep, src, day, batch_id, kind, info or {})

    def _keep(self, src: Path, day: date, batch_id: str, kind: str, info: dict[str, Any]) -> Path:
        folder = self.batch_dir(day, batch_id)
        folder.mkdir(parents=True, exist_ok=True)
        dest = folder / f"{kind}.jsonl.gz"
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:12]}.tmp")
        digest = hashlib.sha256()
        size = 0
        with src.open("rb") as fin, gzip.open(tmp, "wb", compresslevel=5) as fout:
            while chunk := fin.read(_CHUNK):
                digest.update(chunk)
                size += len(chunk)
                fout.write(chunk)
        _fsync(tmp)
        os.replace(tmp, dest)
        self._record(
            folder, kind, {"file": dest.name, "bytes": size, "sha256": digest.hexdigest(), **info}
        )
        _fsync(folder)
        return dest

    def _record(self, folder: Path, kind: str, entry: dict[str, Any]) -> None:
        manifest = folder / "manifest.json"
        with (folder / ".manifest.lock").open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            data: dict[str, Any] = {"batch_id": folder.name, "files": {}}
            if manifest.exists():
                data = json.loads(manifest.read_text())
            data["files"][kind] = entry
            tmp = manifest.with_name(f".manifest.{uuid.uuid4().hex[:12]}.tmp")
            tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
            _fsync(tmp)
            os.replace(tmp, manifest)

    def leftovers(self, min_age_seconds: float = 0.0) -> list[tuple[str, str, Path]]:
        """Spool files not touched for ``min_age_seconds``, which a crash or a
        failed archive write may have left behind: (batch_id, kind, path)."""
        if not self.spool.exists():
            return []
        found = []
        cutoff = time.time() - min_age_seconds
        for path in self.spool.glob("*.jsonl"):
            batch_id, _, kind = path.stem.partition(".")
            try:
                fresh = path.stat().st_mtime > cutoff
            except FileNotFoundError:  # archived meanwhile by its own flow
                continue
            if kind in ("input", "ids", "output", "error") and not fresh:
                found.append((batch_id, kind, path))
        return found

    def find(self, batch_id: str, kind: str) -> Path | None:
        """The archived file of a batch, whatever its day."""
        if not self.root.exists():
            return None
        for day_dir in sorted(self.root.iterdir(), reverse=True):
            candidate = day_dir / batch_id / f"{kind}.jsonl.gz"
            if candidate.exists():
                return candidate
        return None

    def prune(self, keep_days: int, today: date) -> list[Path]:
        """Remove archive days older than ``keep_days``; returns what went."""
        cutoff = today - timedelta(days=keep_days)
        removed: list[Path] = []
        if not self.root.exists():
            return removed
        for day_dir in self.root.iterdir():
            try:
                day = date.fromisoformat(day_dir.name)
            except ValueError:
                continue
            if day < cutoff:
                shutil.rmtree(day_dir)
                removed.append(day_dir)
        return removed


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
