"""One session transcript as a processor sees it: identity from its path, and a single
streaming pass over its lines, parsed to dicts (`lines()`) or decoded to the typed shape a
processor declares (`typed_lines(Shape)`, a `msgspec.Struct` of only the fields it reads).

The pipeline stats a file, then reads exactly that many bytes, hashing them as it goes: the
hash, size and mtime recorded for a session always describe the bytes that were processed, so
an append that lands during processing is simply seen by the next run.
"""

from __future__ import annotations

import hashlib
import os
import queue
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path, PurePosixPath
from typing import IO, Any, TypeVar

import msgspec
import orjson

CHUNK_BYTES = 1 << 20
# Decoded a chunk at a time up to this size; a longer run of lines (a line longer than a chunk)
# goes line by line, so a huge line is not copied again to be decoded.
BULK_BYTES = 8 << 20
# A read of at least this many bytes hashes them on a thread of its own, beside the decoding
# (hashlib lets go of the GIL while it hashes): sha256 is ~1.5 ms per MB here, as much as
# decoding the fields usage reads.
THREAD_HASH_BYTES = 4 << 20
S = TypeVar("S", bound=msgspec.Struct)
_TO_COMMAS = bytes.maketrans(b"\n", b",")


class FileChangedError(Exception):
    """The file shrank or vanished while it was being read."""


@dataclass(frozen=True)
class SessionIdentity:
    """What the path says about a session file.

    `alice/<sid>.jsonl` is a main transcript; `alice/<sid>/subagents/agent-<id>.jsonl` a
    subagent transcript (v2.1+), and so is any `.jsonl` deeper below `subagents/`: a workflow
    subagent, `alice/<sid>/subagents/workflows/<workflow-id>/agent-<id>.jsonl`, also records
    its workflow; `alice/agent-<id>.jsonl` an older subagent file written beside the session
    (its lines carry the parent's sessionId).
    """

    key: str
    username: str
    session_id: str | None
    agent_id: str | None
    workflow_id: str | None = None
    is_subagent: bool = False

    @classmethod
    def from_key(cls, key: str) -> SessionIdentity:
        parts = PurePosixPath(key).parts
        stem = PurePosixPath(key).stem
        agent_id = stem[len("agent-") :] if stem.startswith("agent-") else None
        if len(parts) >= 4 and parts[2] == "subagents":
            workflow_id = parts[4] if len(parts) >= 6 and parts[3] == "workflows" else None
            return cls(key, parts[0], parts[1], agent_id, workflow_id, is_subagent=True)
        session_id = None if agent_id is not None else stem
        return cls(key, parts[0], session_id, agent_id, is_subagent=agent_id is not None)


@dataclass
class Session:
    """A session transcript opened for one read.

    `lines()` yields each complete line that parses to a JSON object. Malformed lines, and
    lines that are valid JSON but not objects, are counted in `malformed_lines` and skipped.
    `typed_lines(Shape)` yields the same lines decoded as `Shape` instead (see there).
    A last line without its newline is an append in progress: it is not yielded, and the
    next run (which will see a new size) reads it.

    A read may start at `start` (an append-safe processor continuing), with `_hasher` already
    holding the bytes before it. After `finish()`, `complete_offset` is where the last
    complete line ends and `complete_hash` the hash of every byte before it: where and from
    what the next increment continues.
    """

    identity: SessionIdentity
    path: Path
    size: int
    _file: IO[bytes]
    start: int = 0
    malformed_lines: int = 0
    _hasher: Any = field(default_factory=hashlib.sha256)
    complete_offset: int = 0
    complete_hash: str | None = None
    _consumed: int = 0
    _reader: Iterator[bytes] | None = None
    _tail: list[bytes] = field(default_factory=list)
    _background: _BackgroundHash | None = None

    def __post_init__(self) -> None:
        self._consumed = self.complete_offset = self.start

    @property
    def key(self) -> str:
        return self.identity.key

    @property
    def username(self) -> str:
        return self.identity.username

    @property
    def session_id(self) -> str | None:
        return self.identity.session_id

    @property
    def agent_id(self) -> str | None:
        return self.identity.agent_id

    @property
    def workflow_id(self) -> str | None:
        return self.identity.workflow_id

    @property
    def is_subagent(self) -> bool:
        return self.identity.is_subagent

    def _chunks(self) -> Iterator[bytes]:
        while self._consumed < self.size:
            chunk = self._file.read(min(CHUNK_BYTES, self.size - self._consumed))
            if not chunk:
                raise FileChangedError(
                    f"file shrank while being read ({self._consumed} of {self.size} bytes)"
                )
            self._consumed += len(chunk)
            yield chunk

    def _complete_runs(self) -> Iterator[bytes]:
        """Per chunk read, the complete lines it ends as one bytes object ending in a newline
        (with the start of its first line, read in earlier chunks), hashing exactly the bytes
        up to the last newline seen."""
        pending: list[bytes] = []  # pieces of a line longer than a chunk: joined once, not O(n²)
        update = self._hasher.update
        if self.size - self.start >= THREAD_HASH_BYTES:
            self._background = _BackgroundHash(self._hasher)
            weakref.finalize(self, self._background.stop)  # a read given up ends its thread
            update = self._background.update
        for chunk in self._chunks():
            last = chunk.rfind(b"\n")
            if last < 0:
                pending.append(chunk)
                continue
            for piece in pending:
                update(piece)
            update(memoryview(chunk)[: last + 1])
            self.complete_offset = self._consumed - (len(chunk) - last - 1)
            run = chunk if last + 1 == len(chunk) else chunk[: last + 1]
            if pending:
                pending.append(run)
                run = b"".join(pending)
                pending.clear()
            yield run
            if last + 1 < len(chunk):
                pending.append(chunk[last + 1 :])
        self._tail = pending

    def _raw_lines(self) -> Iterator[bytes]:
        """Complete lines as bytes, without their newline."""
        for run in self._complete_runs():
            pieces = run.split(b"\n")  # one C-level pass, not a find() per line
            pieces.pop()  # (empty: the run ends with its newline)
            yield from pieces

    def lines(self) -> Iterator[dict[str, Any]]:
        if self._reader is not None:
            raise RuntimeError("Session.lines() can be iterated once")
        self._reader = self._raw_lines()
        # Parsed inline, not in a helper: this loop runs once per line of every file.
        for raw in self._reader:
            if not raw.strip():
                continue
            try:
                value = orjson.loads(raw)
            except orjson.JSONDecodeError:
                self.malformed_lines += 1
                continue
            if isinstance(value, dict):
                yield value
            else:
                self.malformed_lines += 1

    def typed_lines(self, shape: type[S]) -> Iterator[S]:
        """Each complete line decoded as `shape`, a `msgspec.Struct` declaring only the fields
        a processor reads: the rest of the line (tool results, file contents) is skipped, not
        turned into Python objects.

        Exactly the lines `lines()` yields, in order: a line is malformed when it is not a
        JSON object (orjson's judgement: invalid UTF-8 anywhere in it included), never because
        a field has a type the shape does not expect, so a shape must accept any JSON value
        where real lines vary (`Any`, or a union covering every JSON type). One exception:
        a number beyond the range of a double in a field the shape skips does not make the
        line malformed (orjson rejects it; msgspec skips it unread).

        Lines are decoded a chunk (1 MB) at a time, as one JSON array with a comma for every
        newline: that decodes only when every line is exactly one JSON object. A chunk that
        does not (a malformed or blank line in it) is decoded line by line.
        """
        if self._reader is not None:
            raise RuntimeError("Session lines can be iterated once")
        bulk, single = _decoders(shape)
        self._reader = runs = self._complete_runs()
        for run in runs:
            if len(run) <= BULK_BYTES:
                values = _decode_run(bulk, run)
                if values is not None:
                    yield from values
                    continue
            if run.find(b"\n") == len(run) - 1:  # one line: decoded as it is, not copied
                lines: Any = (run,)
            else:
                lines = run.split(b"\n")
                lines.pop()
            for raw in lines:
                if not raw.strip():
                    continue
                value = _decode_line(single, shape, raw)
                if value is None:
                    self.malformed_lines += 1
                else:
                    yield value

    def finish(self) -> str:
        """Read whatever the processor left unread and return the hash of all the bytes."""
        if self._reader is None:
            self._reader = self._raw_lines()
        for _ in self._reader:
            pass
        if self._background is not None:
            self._background.join()
            self._background = None
        self.complete_hash = self._hasher.hexdigest()
        whole = self._hasher.copy()
        for piece in self._tail:
            whole.update(piece)
        return str(whole.hexdigest())

    def complete_hasher(self) -> Any:
        """After `finish()`: a hasher over the bytes up to `complete_offset`, to continue
        from there (the next segment of a read hashes on where this one stopped)."""
        return self._hasher.copy()

    @classmethod
    @contextmanager
    def open(
        cls, path: str | os.PathLike[str], key: str | None = None, start: int = 0
    ) -> Iterator[Session]:
        """Open a transcript outside the pipeline (tests, notebooks). `key` defaults to the
        last two path components, `<user>/<file>`; `start` skips bytes already read."""
        p = Path(path)
        with p.open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            key = key or f"{p.parent.name}/{p.name}"
            hasher = hashlib.sha256()
            hash_into(f, start, hasher)
            yield cls(
                identity=SessionIdentity.from_key(key),
                path=p,
                size=size,
                _file=f,
                start=start,
                _hasher=hasher,
            )


@lru_cache(maxsize=64)
def _decoders(shape: type[Any]) -> tuple[msgspec.json.Decoder[Any], msgspec.json.Decoder[Any]]:
    """A decoder of a run of lines as one array of `shape`, and one of a single line."""
    return msgspec.json.Decoder(list[shape]), msgspec.json.Decoder(shape)  # type: ignore[valid-type]


def _utf8(data: bytes) -> bool:
    """Whether bytes are valid UTF-8 (msgspec does not look inside the strings it skips)."""
    if data.isascii():
        return True
    try:
        data.decode()
    except UnicodeDecodeError:
        return False
    return True


def _decode_run(decoder: msgspec.json.Decoder[Any], run: bytes) -> list[Any] | None:
    """The lines of a run (each ending in a newline) decoded in one call, or None when any
    of them is not exactly one JSON object of the shape: a comma in place of every newline
    makes the run one JSON array, which does not decode if a line is blank, holds two values
    or ends inside one."""
    if not _utf8(run):
        return None
    array = b"".join((b"[", memoryview(run.translate(_TO_COMMAS))[:-1], b"]"))
    try:
        values: list[Any] = decoder.decode(array)
    except (msgspec.DecodeError, RecursionError):
        return None
    return values


def _decode_line(decoder: msgspec.json.Decoder[Any], shape: type[Any], raw: bytes) -> Any:
    """One line decoded as `shape`, or None when orjson would not take it as an object."""
    try:
        value = decoder.decode(raw)
    except (msgspec.DecodeError, RecursionError):
        pass  # not JSON, not an object, or deeper than msgspec goes: orjson decides
    else:
        return value if _utf8(raw) else None
    try:
        parsed = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(parsed, dict):
        return None
    try:
        return msgspec.convert(parsed, shape)
    except (msgspec.ValidationError, RecursionError):
        return None


class _BackgroundHash:
    """Feeds pieces to a hasher, in order, on a thread of its own."""

    def __init__(self, hasher: Any) -> None:
        self._pieces: queue.SimpleQueue[bytes | memoryview | None] = queue.SimpleQueue()
        self._thread = threading.Thread(
            target=_hash_pieces, args=(hasher, self._pieces), name="session-hash", daemon=True
        )
        self._thread.start()

    def update(self, piece: bytes | memoryview) -> None:
        self._pieces.put(piece)

    def stop(self) -> None:
        self._pieces.put(None)

    def join(self) -> None:
        """Wait until every piece is hashed."""
        self.stop()
        self._thread.join()


def _hash_pieces(hasher: Any, pieces: queue.SimpleQueue[bytes | memoryview | None]) -> None:
    while (piece := pieces.get()) is not None:
        hasher.update(piece)


def hash_into(f: IO[bytes], size: int, hasher: Any) -> None:
    """Feed the next `size` bytes of an open file into `hasher`, streamed."""
    remaining = size
    while remaining > 0:
        chunk = f.read(min(CHUNK_BYTES, remaining))
        if not chunk:
            raise FileChangedError(f"file shrank while being hashed ({size - remaining} of {size})")
        hasher.update(chunk)
        remaining -= len(chunk)


def hash_prefix(f: IO[bytes], size: int) -> str:
    """sha256 of the first `size` bytes of an open file, streamed."""
    hasher = hashlib.sha256()
    hash_into(f, size, hasher)
    return str(hasher.hexdigest())
