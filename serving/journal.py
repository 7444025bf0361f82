"""A durable local journal: what the gateway served, on its own disk, until the database has it.

Append-only segment files of JSON lines (``segment-<first seq>.jsonl``), one record per line with a
sequence number, written and ``fsync``-ed in groups (every request waiting at one moment shares
one ``fsync``). The database writer reads the records in order and, once they are committed in the
database, moves the checkpoint (the ``committed`` file, replaced atomically) past them; segments
wholly behind the checkpoint are deleted. On open, what is after the checkpoint is read again (a
restart replays it), and a torn last line (a crash mid-write) is cut off: it was never
acknowledged. A record may be handed to the database twice (a crash between the database's commit
and the checkpoint's): the database write must be idempotent (the prediction log keys it by
``prediction_id``).

The journal is bounded (``max_bytes`` of segment files): a group that does not fit is refused
(``JournalFull``), never dropped silently. One process per directory (an advisory ``flock``).
Every method does file I/O: call them from a worker thread, one at a time (a lock serialises them).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from serving.errors import ServingError

log = logging.getLogger(__name__)

SEGMENT_PREFIX = "segment-"
SEGMENT_SUFFIX = ".jsonl"
CHECKPOINT = "committed"
LOCK = "lock"


class JournalError(ServingError):
    """The journal cannot take a record now; the prediction was not logged (nor served)."""


class JournalFull(JournalError):
    """The journal reached its bound (the database has been unreachable for a while)."""


class JournalInUse(JournalError):
    """Another process holds the journal directory."""


@dataclass(frozen=True)
class Entry:
    seq: int
    record: dict


def _fsync_directory(directory: Path) -> None:
    """Make a file's creation, rename or removal in ``directory`` durable."""
    handle = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def _parsed(line: bytes) -> dict | None:
    """One journal line's ``{"seq", "record"}``, or None when it is not one."""
    try:
        item = json.loads(line)
    except ValueError:
        return None
    return item if isinstance(item, dict) and isinstance(item.get("seq"), int) and "record" in item else None


def segment_name(first_seq: int) -> str:
    return f"{SEGMENT_PREFIX}{first_seq:020d}{SEGMENT_SUFFIX}"


class Journal:
    """The journal in ``directory``, at most ``max_bytes`` of segments of about ``segment_bytes``."""

    def __init__(self, directory: Path, max_bytes: int, segment_bytes: int | None = None) -> None:
        if max_bytes < 4096:
            raise ValueError(f"journal max_bytes {max_bytes} is under 4096")
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes or max(1024, min(8 << 20, max_bytes // 8))
        self.committed_seq = 0  # the last sequence number the database has
        self.last_seq = 0  # the last sequence number written (and synced)
        self.unreadable_lines = 0  # lines read that were no record (skipped)
        self._sizes: dict[int, int] = {}  # first seq of each segment -> its bytes
        self._cursor: tuple[int, int] = (0, 0)  # (segment's first seq, byte offset) of the next read
        self._handle = None  # the last segment, open for appending
        self._lock_handle = None
        self._lock = threading.Lock()

    @property
    def size_bytes(self) -> int:
        return sum(self._sizes.values())

    @property
    def pending(self) -> int:
        """Records not yet committed in the database."""
        return self.last_seq - self.committed_seq

    def open(self) -> None:
        """Take the directory, read the checkpoint and the segments, cut a torn last line off."""
        with self._lock:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._lock_handle = open(self.directory / LOCK, "a")  # noqa: SIM115 - held while open
            try:
                fcntl.flock(self._lock_handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as error:
                self._lock_handle.close()
                raise JournalInUse(f"the prediction journal {self.directory} is in use by another process: give "
                                   "each gateway process its own GATEWAY_JOURNAL_DIR") from error
            checkpoint = self.directory / CHECKPOINT
            self.committed_seq = int(checkpoint.read_text().strip() or 0) if checkpoint.exists() else 0
            for path in self.directory.glob(f"{SEGMENT_PREFIX}*{SEGMENT_SUFFIX}"):
                self._sizes[int(path.name[len(SEGMENT_PREFIX):-len(SEGMENT_SUFFIX)])] = path.stat().st_size
            self.last_seq = max(self.committed_seq, self._repair_last_segment())
            self._cursor = (min(self._sizes), 0) if self._sizes else (self.last_seq + 1, 0)

    def _repair_last_segment(self) -> int:
        """The last sequence number in the segments (0: none), after cutting off a torn last line."""
        if not self._sizes:
            return 0
        first = max(self._sizes)
        path = self.directory / segment_name(first)
        data = path.read_bytes()
        whole = data[:data.rfind(b"\n") + 1]
        if len(whole) < len(data):
            with open(path, "r+b") as handle:
                handle.truncate(len(whole))
                os.fsync(handle.fileno())
            self._sizes[first] = len(whole)
        items = (_parsed(line) for line in reversed(whole.splitlines()))
        return next((item["seq"] for item in items if item is not None), first - 1)

    def append(self, groups: list[list[dict]]) -> list[int | JournalError]:
        """Append each group of records whole, then ``fsync`` once; per group, the sequence number
        of its last record, or JournalFull when the group would pass the bound (nothing of it written)."""
        with self._lock:
            outcomes: list[int | JournalError] = []
            for records in groups:
                lines = []
                for offset, record in enumerate(records, start=1):
                    lines.append(json.dumps({"seq": self.last_seq + offset, "record": record},
                                            separators=(",", ":")) + "\n")
                data = "".join(lines).encode()
                if self.size_bytes + len(data) > self.max_bytes:
                    outcomes.append(JournalFull(
                        f"the prediction journal is full ({self.size_bytes} of {self.max_bytes} bytes, "
                        f"{self.pending} predictions waiting for the prediction log's database)"))
                    continue
                self._write(data)
                self.last_seq += len(records)
                outcomes.append(self.last_seq)
            if self._handle is not None:
                self._handle.flush()
                os.fsync(self._handle.fileno())
            return outcomes

    def _write(self, data: bytes) -> None:
        """Append to the last segment, starting a new one when it is full (or there is none)."""
        last = max(self._sizes) if self._sizes else None
        if last is None or self._sizes[last] >= self.segment_bytes:
            if self._handle is not None:
                self._handle.flush()
                os.fsync(self._handle.fileno())
                self._handle.close()
            last = self.last_seq + 1
            self._handle = open(self.directory / segment_name(last), "ab")  # noqa: SIM115 - kept open
            self._sizes[last] = 0
            _fsync_directory(self.directory)
        elif self._handle is None:
            self._handle = open(self.directory / segment_name(last), "ab")  # noqa: SIM115 - kept open
        self._handle.write(data)
        self._sizes[last] += len(data)

    def read(self, limit: int) -> list[Entry]:
        """The next at most ``limit`` records after those read before (on open: after the checkpoint)."""
        with self._lock:
            if self._handle is not None:
                self._handle.flush()
            entries: list[Entry] = []
            while len(entries) < limit:
                first, offset = self._cursor
                if first not in self._sizes:  # not yet started, or spent and deleted: on to the next one
                    later = [seq for seq in self._sizes if seq > first]
                    if not later:
                        break
                    self._cursor = (min(later), 0)
                    continue
                with open(self.directory / segment_name(first), "rb") as handle:
                    handle.seek(offset)
                    while len(entries) < limit and (line := handle.readline()):
                        item = _parsed(line)
                        if item is None:
                            self.unreadable_lines += 1
                            log.error("prediction journal %s: an unreadable line at byte %d skipped (torn by a "
                                      "failed write, never acknowledged)", segment_name(first), handle.tell())
                        elif item["seq"] > self.committed_seq:
                            entries.append(Entry(item["seq"], item["record"]))
                    offset = handle.tell()
                later = [seq for seq in self._sizes if seq > first]
                if offset >= self._sizes[first] and later:
                    self._cursor = (min(later), 0)
                else:
                    self._cursor = (first, offset)
                    if len(entries) < limit:
                        break
            return entries

    def commit(self, seq: int) -> None:
        """The database has every record up to ``seq``: move the checkpoint, delete spent segments."""
        with self._lock:
            temporary = self.directory / f".{CHECKPOINT}.tmp"
            with open(temporary, "w") as handle:
                handle.write(str(seq))
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, self.directory / CHECKPOINT)
            self.committed_seq = seq
            firsts = sorted(self._sizes)
            spent = [first for first, after in zip(firsts, firsts[1:]) if after - 1 <= seq]
            for first in spent:
                (self.directory / segment_name(first)).unlink()
                del self._sizes[first]
            _fsync_directory(self.directory)

    def close(self) -> None:
        with self._lock:
            if self._handle is not None:
                self._handle.flush()
                os.fsync(self._handle.fileno())
                self._handle.close()
                self._handle = None
            if self._lock_handle is not None:
                self._lock_handle.close()  # releases the flock
                self._lock_handle = None
