"""Token cache: each (dataset, split, tokenizer, settings) tokenized once into a memory-mapped file.

Layout under ``cache_dir/<dataset>/``::

    <split>-<key>.bin    token ids, raw little-endian uint16 (vocab <= 65536) or uint32
    <split>-<key>.json   metadata; its presence marks the .bin as complete

``key`` hashes the ``spec`` dict (source identity, tokenizer fingerprint, add_eos, ...), so a
change of any of them builds a new file instead of reusing a stale one.

Atomicity: ids are streamed through :func:`serengeti.io.atomic.atomic_write` (a temporary file
beside the .bin, fsynced and renamed into place; temporaries of dead writers are removed); the
metadata is written the same way *after* the rename. A builder killed at any point leaves either no
.bin, or a .bin without its .json: both mean "not built", and the next run rebuilds.

Integrity: the metadata records the SHA-256 of the .bin and its smallest and largest id. Readers
check the size, then hash the file (about 0.5 s per 100M uint16 tokens; docs/reliability.md) and
check the largest id against the vocabulary; a file that fails (a disk error, a file edited or
copied over in place) is rebuilt with a warning, never used. Entries written before checksums were
recorded are rebuilt once.

DDP: when ``torch.distributed`` is initialized only global rank 0 builds; the other ranks poll
for the metadata file (the cache directory must be shared by all ranks) and raise rank 0's
error if its build fails. Independent processes that are not in one process group serialize
their builds with an advisory file lock.
"""
from __future__ import annotations

import fcntl
import hashlib
import itertools
import json
import logging
import os
import re
import socket
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from serengeti.data.tokenizers import PIECE_CHARS, text_pieces
from serengeti.errors import ConfigError
from serengeti.io.atomic import atomic_write, atomic_write_text

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab_size <= 65536), else uint32."""
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")


def spec_key(spec: dict) -> str:
    return hashlib.sha256(json.dumps({"format": FORMAT_VERSION, **spec}, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class CachePaths:
    bin: Path
    meta: Path

    @property
    def error(self) -> Path:
        return self.meta.with_suffix(".error")

    @property
    def lock(self) -> Path:
        return self.meta.with_suffix(".lock")


def check_cache_name(name: str, key: str = "dataset.name") -> str:
    """``name`` if it is one plain file name (letters, digits, ``-``, ``_``, ``.``; not starting with a dot),
    so that a cache never lands outside ``cache_dir``; else ``ValueError`` naming ``key``."""
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9._-]*", name):
        raise ValueError(f"{key}={name!r}: expected a plain name for the token cache "
                         "(letters, digits, '-', '_', '.'; no '/' and no leading '.')")
    return name


def cache_paths(cache_dir: str | os.PathLike, dataset: str, split: str, spec: dict) -> CachePaths:
    root = Path(cache_dir).expanduser() / check_cache_name(dataset)
    stem = f"{check_cache_name(split, 'dataset split')}-{spec_key(spec)}"
    return CachePaths(root / f"{stem}.bin", root / f"{stem}.json")


@dataclass
class TokenArray:
    """A memory-mapped token stream and its metadata. ``tokens: (N,)`` uint16/uint32."""

    tokens: np.ndarray
    meta: dict
    path: Path
    built: bool  # True if this process tokenized it (False: reused from the cache)

    def __len__(self) -> int:
        return len(self.tokens)


_HASHED: dict[tuple, str] = {}  # (path, inode, size, mtime) -> SHA-256, so one process hashes a file once


def file_sha256(path: Path, chunk_bytes: int = 16 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks (remembered for the file's current inode, size and mtime)."""
    st = path.stat()
    stamp = (str(path), st.st_ino, st.st_size, st.st_mtime_ns)
    if stamp not in _HASHED:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(chunk_bytes):
                digest.update(chunk)
        _HASHED[stamp] = digest.hexdigest()
    return _HASHED[stamp]


def _mismatch(paths: CachePaths, meta: dict, *, checksum: bool) -> str | None:
    """Why ``paths.bin`` cannot be trusted (``None``: it matches its metadata); ``checksum=False`` skips the hash."""
    try:
        size = meta["num_tokens"] * np.dtype(meta["dtype"]).itemsize
        recorded, vocab, max_id = meta["sha256"], meta["vocab_size"], meta["max_id"]
    except (KeyError, TypeError):
        return "incomplete metadata, or written before checksums were recorded"
    if paths.bin.stat().st_size != size:
        return "size"
    if max_id is not None and not 0 <= max_id < vocab:
        return f"largest id {max_id} is outside the vocabulary of {vocab}"
    if checksum and file_sha256(paths.bin) != recorded:
        return "checksum"
    return None


def read_cache(paths: CachePaths, *, verify: bool = True) -> TokenArray | None:
    """Open a complete cache entry, or return None if it is missing, incomplete or fails its checks.

    ``verify=False`` checks the size but skips the checksum: for a file this process has just written.
    """
    if not paths.meta.is_file() or not paths.bin.is_file():
        return None
    try:
        meta = json.loads(paths.meta.read_text())
    except (json.JSONDecodeError, OSError):
        return None
    problem = _mismatch(paths, meta, checksum=verify)
    if problem is not None:
        log.warning("token cache %s does not match its metadata (%s); rebuilding", paths.bin, problem)
        return None
    dtype = np.dtype(meta["dtype"])
    if meta["num_tokens"] == 0:
        tokens = np.zeros(0, dtype=dtype)
    else:
        tokens = np.memmap(paths.bin, dtype=dtype, mode="r", shape=(meta["num_tokens"],))
    return TokenArray(tokens, meta, paths.bin, built=False)


def _pieces(docs: Iterable, piece_chars: int) -> Iterator[tuple[str, bool, bool]]:
    """``(text, ends_document, document_empty)`` pieces of at most ``piece_chars`` characters: a long string
    or a :class:`~serengeti.data.sources.TextStream` is split (:func:`~serengeti.data.tokenizers.text_pieces`)."""
    for doc in docs:
        if isinstance(doc, str) and len(doc) <= piece_chars:
            yield doc, True, not doc
            continue
        pieces = text_pieces([doc] if isinstance(doc, str) else doc, piece_chars)
        piece, empty = next(pieces), True
        for following in pieces:
            empty = empty and not piece
            yield piece, False, False
            piece = following
        yield piece, True, empty and not piece


def _batches(pieces: Iterator[tuple[str, bool, bool]], batch_docs: int, batch_chars: int) -> Iterator[list]:
    """Lists of pieces of at most ``batch_docs`` items and about ``batch_chars`` characters (bounded memory)."""
    batch: list = []
    chars = 0
    for item in pieces:
        batch.append(item)
        chars += len(item[0])
        if len(batch) >= batch_docs or chars >= batch_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def write_tokens(docs: Iterable, tokenizer, paths: CachePaths, *, add_eos: bool, spec: dict,
                 batch_docs: int = 1024, max_tokens: int | None = None,
                 progress_every_bytes: int = 64 << 20, piece_chars: int = PIECE_CHARS) -> dict:
    """Tokenize ``docs`` into ``paths.bin`` (atomically) and write ``paths.meta``; return the metadata.

    Documents (strings, or :class:`~serengeti.data.sources.TextStream` for large files) are encoded
    ``batch_docs`` at a time, at most about ``piece_chars`` characters per call; a longer document is
    encoded in pieces cut where the ids do not change, so memory stays bounded whatever the size of
    a document or the corpus. With ``add_eos`` the EOS id follows every non-empty document.
    ``max_tokens`` truncates the stream (the limit is part of ``spec``).
    """
    if add_eos and tokenizer.eos_id is None:
        raise ValueError(f"dataset.add_eos=true but the tokenizer {tokenizer!r} has no end-of-text token")
    dtype = token_dtype(tokenizer.vocab_size)
    n_tokens = n_docs = n_bytes = 0
    digest, min_id, max_id = hashlib.sha256(), None, None
    start = time.perf_counter()

    def stream(f) -> None:
        nonlocal n_tokens, n_docs, n_bytes, min_id, max_id
        next_report = progress_every_bytes
        for batch in _batches(_pieces(docs, piece_chars), batch_docs, piece_chars):
            ids = tokenizer.encode_batch([text for text, _, _ in batch])
            pieces = []
            for (text, ends, empty), piece_ids in zip(batch, ids):
                pieces.append(piece_ids)
                if ends and not empty:
                    n_docs += 1
                    if add_eos:
                        pieces.append([tokenizer.eos_id])
            n_bytes += sum(len(text.encode("utf-8")) for text, _, _ in batch)
            arr = np.fromiter(itertools.chain.from_iterable(pieces), dtype=np.int64, count=sum(map(len, pieces)))
            del ids, pieces
            if max_tokens is not None and n_tokens + len(arr) > max_tokens:
                arr = arr[: max_tokens - n_tokens]
            if len(arr):
                lo, hi = int(arr.min()), int(arr.max())
                if lo < 0 or hi >= tokenizer.vocab_size:
                    raise ValueError(f"tokenizer {tokenizer!r} produced an id outside [0, {tokenizer.vocab_size})")
                min_id, max_id = min(lo, min_id if min_id is not None else lo), max(hi, max_id if max_id is not None else hi)
            data = arr.astype(dtype).tobytes()
            digest.update(data)
            f.write(data)
            n_tokens += len(arr)
            if n_bytes >= next_report:
                now = time.perf_counter()
                log.info("tokenized %.1f MB, %d tokens (%.2f MB/s)", n_bytes / 1e6, n_tokens, n_bytes / 1e6 / (now - start))
                next_report += progress_every_bytes
            if max_tokens is not None and n_tokens >= max_tokens:
                break

    atomic_write(paths.bin, stream)
    seconds = time.perf_counter() - start
    meta = {
        "format": FORMAT_VERSION, "num_tokens": n_tokens, "dtype": dtype.str, "vocab_size": tokenizer.vocab_size,
        "eos_id": tokenizer.eos_id, "add_eos": add_eos, "num_documents": n_docs, "num_bytes": n_bytes,
        "sha256": digest.hexdigest(), "min_id": min_id, "max_id": max_id,
        "build_seconds": round(seconds, 3), "mb_per_s": round(n_bytes / 1e6 / max(seconds, 1e-9), 3),
        "tokenizer": getattr(tokenizer, "name", repr(tokenizer)), "spec": spec,
        "built_by": f"{socket.gethostname()}:{os.getpid()}",
    }
    atomic_write_text(paths.meta, json.dumps(meta, indent=1, default=str))
    return meta


@contextmanager
def _file_lock(path: Path):
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock_file = open(path, "a")
    except OSError as e:  # the first write into the cache directory: say which setting points there
        raise ConfigError(f"dataset.cache_dir: cannot write the token cache into {path.parent} "
                          f"({e.strerror or e})") from None
    with lock_file as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _dist_info() -> tuple[int, int]:
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - torch is a dependency
        return 0, 1
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _broadcast_run_id() -> str:
    import torch.distributed as dist

    box = [uuid.uuid4().hex if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def build_locked(paths: CachePaths, build: Callable[[], dict]) -> TokenArray:
    with _file_lock(paths.lock):
        cached = read_cache(paths)  # another process may have finished while we waited
        if cached is not None:
            return cached
        paths.meta.unlink(missing_ok=True)
        build()
    out = read_cache(paths, verify=False)  # hashed while it was written
    if out is None:
        raise RuntimeError(f"token cache {paths.bin} was written but cannot be read back")
    out.built = True
    return out


def ensure_tokens(paths: CachePaths, build: Callable[[], dict], *, wait_timeout_s: float = 6 * 3600,
                  poll_s: float = 0.5) -> TokenArray:
    """Return the cached token array, building it with ``build()`` if needed (DDP-safe; see module doc)."""
    rank, world = _dist_info()
    if world == 1:
        return read_cache(paths) or build_locked(paths, build)
    run_id = _broadcast_run_id()
    if rank == 0:
        paths.error.unlink(missing_ok=True)
        try:
            return read_cache(paths) or build_locked(paths, build)
        except BaseException as err:
            paths.bin.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(paths.error, json.dumps({"run_id": run_id, "error": f"{type(err).__name__}: {err}"}))
            raise
    deadline = time.monotonic() + wait_timeout_s
    while True:
        cached = read_cache(paths)
        if cached is not None:
            return cached
        if paths.error.is_file():
            try:
                failure = json.loads(paths.error.read_text())
            except (json.JSONDecodeError, OSError):
                failure = {}
            if failure.get("run_id") == run_id:
                raise RuntimeError(f"rank 0 failed to build the token cache {paths.bin}: {failure['error']}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"rank {rank} waited {wait_timeout_s:.0f} s for rank 0 to build {paths.meta}; "
                               "dataset.cache_dir must be a directory shared by all ranks")
        time.sleep(poll_s)
