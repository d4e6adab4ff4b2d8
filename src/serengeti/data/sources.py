"""Where language-modeling text comes from: local files or Hugging Face ``datasets``.

A source yields the documents (strings) of a split, optionally one shard of them, and describes
itself for the token-cache key. Split names are ``train``, ``validation`` and ``test``.

* :class:`LocalFiles`: text files (one document per file, or per line with the Hugging Face
  ``wikitext`` row convention), JSON lines (``.jsonl``, ``.jsonl.gz``, ``.jsonl.zst``; one document
  per record, field ``text_field``) and Parquet files, listed or globbed per split.
* :class:`HFDataset`: ``datasets.load_dataset(name, config)``, in memory-mapped Arrow form or
  streamed.

Text must be UTF-8 without NUL characters: a file that is not (a binary file, another encoding)
stops with :class:`DataFileError` naming it, as does a malformed JSON line or Parquet file.

Either can carve a validation split out of ``train`` (OpenWebText has none): a document goes to
``validation`` when a seeded hash of its index falls below ``val_ratio``, so the choice needs no
pass over the data and is the same streamed or not.
"""
from __future__ import annotations

import glob
import gzip
import io
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from serengeti.errors import ConfigError

SPLITS = ("train", "validation", "test")
_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def in_carved_validation(index: int, val_ratio: float, seed: int) -> bool:
    """Whether document ``index`` of ``train`` belongs to the carved-out validation split."""
    return _splitmix64(_splitmix64(seed) ^ index) < val_ratio * 2.0**64


def _carve(docs: Iterator[str], split: str, val_ratio: float, seed: int) -> Iterator[str]:
    want_val = split == "validation"
    for i, doc in enumerate(docs):
        if in_carved_validation(i, val_ratio, seed) == want_val:
            yield doc


class DataFileError(ConfigError):
    """A configured data file cannot be read as text; the message names the file and the config key."""


def check_text(text: str, where: str) -> str:
    """``text`` unchanged, or :class:`DataFileError` if it holds a NUL character (binary data)."""
    nul = text.find("\x00")
    if nul >= 0:
        raise DataFileError(f"{where} holds binary data (a NUL character at character {nul}), not text")
    return text


def read_text_file(path: Path, where: str) -> str:
    """The whole file as UTF-8 text; :class:`DataFileError` names ``where`` (key and file) if it is not text."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataFileError(f"{where} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}: {e.reason}); "
                            "convert it to UTF-8") from None
    return check_text(text, where)


LARGE_FILE_BYTES = 16 << 20  # a one-document file above this is read in chunks (TextStream), not as one string


class TextStream:
    """One document too large to hold as one string: a UTF-8 text file read ``chunk_chars`` characters at a time.

    Iterating yields the chunks (each checked like :func:`read_text_file`); ``str(stream)`` reads it all.
    The token cache tokenizes it piece by piece (:func:`serengeti.data.tokenizers.text_pieces`).
    """

    def __init__(self, path: Path, where: str, chunk_chars: int = 4 << 20) -> None:
        self.path, self.where, self.chunk_chars = Path(path), where, chunk_chars

    def __iter__(self) -> Iterator[str]:
        offset = 0
        with open(self.path, encoding="utf-8", newline="") as fh:
            while True:
                try:
                    chunk = fh.read(self.chunk_chars)
                except UnicodeDecodeError as e:
                    raise DataFileError(f"{self.where} is not UTF-8 text (byte 0x{e.object[e.start]:02x} after "
                                        f"character {offset}: {e.reason}); convert it to UTF-8") from None
                if not chunk:
                    return
                check_text(chunk, self.where)
                offset += len(chunk)
                yield chunk

    def __bool__(self) -> bool:
        return self.path.stat().st_size > 0

    def __str__(self) -> str:
        return "".join(self)


def document_text(doc: str | TextStream) -> str:
    """A document as one string (a :class:`TextStream` is read whole: for small uses only)."""
    return doc if isinstance(doc, str) else str(doc)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")


class LocalFiles:
    """Documents from local files.

    Args:
        name: dataset name (cache sub-directory).
        splits: ``{split: path | glob | list of them}``; a split may be absent.
        unit: ``"file"`` (each text file is one document) or ``"line"`` (each line is one row:
            ``""`` for a blank line, else the line with its newline, as Hugging Face ``wikitext``).
            JSON-lines and Parquet files always give one document per record.
        text_field: record field holding the text (JSON lines / Parquet).
        val_ratio: if set and ``validation`` is not given, carve it out of ``train``.
        val_seed: seed of the carving hash.
        key: config key named in error messages.
    """

    def __init__(self, name: str, splits: Mapping[str, str | Sequence[str] | None], *, unit: str = "file",
                 text_field: str = "text", val_ratio: float | None = None, val_seed: int = 2357,
                 key: str = "dataset") -> None:
        if unit not in ("file", "line"):
            raise ValueError(f"{key}.unit must be 'file' or 'line', got {unit!r}")
        self.name, self.unit, self.text_field, self.key = name, unit, text_field, key
        self.val_ratio, self.val_seed = val_ratio, val_seed
        self.patterns = {s: ([p] if isinstance(p, (str, os.PathLike)) else list(p)) for s, p in splits.items() if p}
        for s in self.patterns:
            _check_split(s)

    @property
    def carving(self) -> bool:
        """True when ``validation`` is carved out of ``train`` (both splits then filter by hash)."""
        return self.val_ratio is not None and "validation" not in self.patterns

    def files(self, split: str) -> list[Path]:
        """Resolved files of ``split`` (sorted within each glob), or a clear error."""
        _check_split(split)
        source = "train" if split == "validation" and self.carving else split
        if source not in self.patterns:
            raise FileNotFoundError(f"{self.key}: no {split} split is configured for {self.name} "
                                    f"(configured: {sorted(self.patterns) or 'none'})")
        files: list[Path] = []
        for pattern in self.patterns[source]:
            pattern = os.path.expanduser(str(pattern))
            matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
            if not matches or not all(os.path.isfile(m) for m in matches):
                missing = pattern if not matches else next(m for m in matches if not os.path.isfile(m))
                raise FileNotFoundError(f"{self.key}: file for the {split} split not found: {missing}")
            files.extend(Path(m).resolve() for m in matches)
        return files

    def has_split(self, split: str) -> bool:
        return split in self.patterns or (split == "validation" and self.carving)

    def identity(self, split: str) -> dict:
        files = self.files(split)
        ident = {"files": [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files], "unit": self.unit,
                 "text_field": self.text_field}
        if self.carving and split in ("train", "validation"):
            ident["carve"] = [self.val_ratio, self.val_seed]
        return ident

    def documents(self, split: str, shard: int = 0, num_shards: int = 1) -> Iterator[str | TextStream]:
        """The split's documents; a one-document file larger than :data:`LARGE_FILE_BYTES` comes as a
        :class:`TextStream`."""
        files = self.files(split)
        carve = self.carving and split in ("train", "validation")
        if num_shards > 1 and len(files) >= num_shards and not carve:
            yield from self._read(files[shard::num_shards], split)
            return
        docs = self._read(files, split)
        if carve:
            docs = _carve(docs, split, self.val_ratio, self.val_seed)
        for i, doc in enumerate(docs):
            if i % num_shards == shard:
                yield doc

    def _read(self, files: Sequence[Path], split: str) -> Iterator[str]:
        for f in files:
            where = f"{self.key}: the {split} file {f}"
            name = f.name.lower()
            if self.unit == "file" and not name.endswith(_RECORD_SUFFIXES):
                yield TextStream(f, where) if f.stat().st_size > LARGE_FILE_BYTES else read_text_file(f, where)
                continue
            try:
                for doc in self._records(f):
                    yield check_text(doc, where)
            except DataFileError:
                raise
            except ImportError as e:  # a missing optional decompressor: keep its install hint
                raise DataFileError(f"{where} cannot be read: {e}") from None
            except UnicodeDecodeError as e:
                raise DataFileError(f"{where} is not UTF-8 text (byte 0x{e.object[e.start]:02x}: {e.reason}); "
                                    "convert it to UTF-8") from None
            except (ValueError, OSError, EOFError) as e:  # malformed JSON, Parquet or gzip data
                raise DataFileError(f"{where} cannot be read: {e}") from None

    def _records(self, f: Path) -> Iterator[str]:
        """Documents of one file: Parquet / JSON-lines records, or lines (``unit='line'``)."""
        name = f.name.lower()
        if name.endswith(".parquet"):
            yield from _read_parquet(f, self.text_field)
        elif name.endswith(_RECORD_SUFFIXES):
            yield from _read_jsonl(f, self.text_field)
        else:
            with open(f, encoding="utf-8", newline="") as fh:
                for line in fh:
                    yield line if line.strip() else ""


_RECORD_SUFFIXES = (".parquet", ".jsonl", ".jsonl.gz", ".jsonl.zst", ".json.gz", ".json.zst")


def _open_text(path: Path) -> io.TextIOBase:
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    if path.name.endswith(".zst"):
        try:
            import zstandard
        except ImportError:
            raise ImportError(f"reading {path} needs the 'zstandard' package (pip install zstandard)") from None
        return io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(open(path, "rb")), encoding="utf-8")
    return open(path, encoding="utf-8")


def _read_jsonl(path: Path, field: str) -> Iterator[str]:
    with _open_text(path) as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"line {lineno} is not JSON ({e.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get(field), str):
                raise ValueError(f"line {lineno} has no text field {field!r} (dataset.text_field)")
            yield record[field]


def _read_parquet(path: Path, field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    if field not in pf.schema_arrow.names:
        raise ValueError(f"it has no column {field!r} (dataset.text_field)")
    for batch in pf.iter_batches(columns=[field], batch_size=1024):
        for text in batch.column(0).to_pylist():
            if not isinstance(text, str):
                raise ValueError(f"column {field!r} (dataset.text_field) holds {type(text).__name__}, not text")
            yield text


class HFDataset:
    """Documents from ``datasets.load_dataset(hf_name, hf_config)``.

    Args:
        name: dataset name (cache sub-directory).
        hf_name, hf_config: as for ``load_dataset``.
        text_field: column holding the text.
        split_names: ``{our split: the dataset's split name}`` for the splits it has (default: all
            three under their own names).
        streaming: read with ``streaming=True`` (no full download).
        val_ratio, val_seed: carve ``validation`` out of ``train`` when the dataset has none.
        load_kwargs: extra ``load_dataset`` keyword arguments (``cache_dir``, ``revision`` ...).
    """

    def __init__(self, name: str, hf_name: str, hf_config: str | None = None, *, text_field: str = "text",
                 split_names: Mapping[str, str] | None = None, streaming: bool = False,
                 val_ratio: float | None = None, val_seed: int = 2357, load_kwargs: Mapping | None = None) -> None:
        self.name, self.hf_name, self.hf_config, self.text_field = name, hf_name, hf_config, text_field
        self.split_names = dict(split_names) if split_names is not None else {s: s for s in SPLITS}
        self.streaming, self.val_ratio, self.val_seed = streaming, val_ratio, val_seed
        self.load_kwargs = dict(load_kwargs or {})

    def carved(self, split: str) -> bool:
        return split in ("train", "validation") and self.val_ratio is not None

    def has_split(self, split: str) -> bool:
        return split in self.split_names or self.carved(split)

    def _hf_split(self, split: str) -> str:
        _check_split(split)
        if self.carved(split):
            return self.split_names["train"]
        if split not in self.split_names:
            raise ValueError(f"{self.hf_name} has no {split} split (dataset.split_names: {self.split_names}); "
                             "set dataset.val_ratio to carve a validation split out of train")
        return self.split_names[split]

    def identity(self, split: str) -> dict:
        return {"hf_name": self.hf_name, "hf_config": self.hf_config, "split": self._hf_split(split),
                "text_field": self.text_field, "carve": [self.val_ratio, self.val_seed] if self.carved(split) else None,
                "revision": self.load_kwargs.get("revision")}

    def _load(self, split: str):
        from datasets import load_dataset

        hf_split = self._hf_split(split)
        try:
            return load_dataset(self.hf_name, self.hf_config, split=hf_split, streaming=self.streaming, **self.load_kwargs)
        except (FileNotFoundError, ConnectionError, ValueError, OSError) as err:
            raise type(err)(f"load_dataset({self.hf_name!r}, {self.hf_config!r}, split={hf_split!r}) failed: {err}. "
                            "Offline, set dataset.path to local files") from err

    def documents(self, split: str, shard: int = 0, num_shards: int = 1) -> Iterator[str]:
        ds = self._load(split)
        carve = self.carved(split)
        if self.streaming and num_shards > 1 and not carve:
            from datasets.distributed import split_dataset_by_node

            ds = split_dataset_by_node(ds, rank=shard, world_size=num_shards)
            shard, num_shards = 0, 1
        if self.text_field not in (ds.column_names or [self.text_field]):
            raise ValueError(f"{self.hf_name} has no column {self.text_field!r} (dataset.text_field); "
                             f"columns: {ds.column_names}")
        docs = (t for batch in ds.iter(batch_size=1000) for t in batch[self.text_field])
        if carve:
            docs = _carve(docs, split, self.val_ratio, self.val_seed)
        for i, doc in enumerate(docs):
            if i % num_shards == shard:
                yield doc
