"""Tokenizers for language-modeling data: GPT-2 byte-level BPE and character level.

Both expose the same small surface, which is all the data pipeline needs:

* ``vocab_size``: number of ids (before any padding of the model's embedding);
* ``eos_id``: the id appended after each document when ``add_eos`` is set (``None`` if the
  tokenizer has no end-of-text symbol);
* ``fingerprint``: a hash of everything that changes the ids (part of the token-cache key);
* ``encode_batch(texts) -> list[list[int]]`` and ``decode(ids) -> str``.

The BPE tokenizer runs the Rust ``tokenizers`` backend, whose ``encode_batch`` spreads a batch
over threads (``RAYON_NUM_THREADS`` caps them), so no Python worker processes are needed.

Long texts are tokenized in pieces (:func:`text_pieces`): the backend holds about 150 bytes per
input byte while it encodes, so one 300 MB document would need 45 GB. Pieces are cut where the
GPT-2 pre-tokenizer splits anyway (after a newline between two non-space characters, or before a
space between two non-space characters), and byte-level BPE never merges across those splits, so
the ids are the same as for the whole text (tests/test_data_memory.py checks this on real text).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from serengeti.errors import CheckpointError
from serengeti.io.checkpoint import TOKENIZER_NAME, first_line

log = logging.getLogger(__name__)

DEFAULT_EOS_TOKEN = "<|endoftext|>"


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


class BPETokenizer:
    """A Hugging Face ``tokenizers.Tokenizer`` (GPT-2 BPE by default) behind the pipeline's interface.

    Args:
        backend: a ``tokenizers.Tokenizer``.
        name: how the tokenizer was specified (for messages and the cache metadata).
        eos_token: the end-of-text token; must be in the vocabulary.
    """

    def transformers_files(self, model_max_length: int | None = None) -> dict[str, str]:
        """:func:`transformers_tokenizer_files` of this tokenizer (what an export writes for ``AutoTokenizer``)."""
        return transformers_tokenizer_files(self, model_max_length)

    def __init__(self, backend, name: str, eos_token: str = DEFAULT_EOS_TOKEN) -> None:
        self.backend = backend
        self.name = name
        self.vocab_size = int(backend.get_vocab_size(with_added_tokens=True))
        self.eos_id = backend.token_to_id(eos_token)
        if self.eos_id is None:
            raise ValueError(f"dataset.tokenizer={name!r} has no end-of-text token {eos_token!r} (dataset.eos_token)")
        self.fingerprint = _sha(backend.to_str())

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text (no special tokens added; EOS is added by the caller)."""
        encode = getattr(self.backend, "encode_batch_fast", self.backend.encode_batch)  # fast: no offsets kept
        return [e.ids for e in encode(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        """Exact inverse of ``encode_batch`` on a whole text (special tokens are kept as text)."""
        return self.backend.decode(list(map(int, ids)), skip_special_tokens=False)

    def __repr__(self) -> str:
        return f"BPETokenizer({self.name!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id})"


class CharTokenizer:
    """Character-level tokenizer: id = position of the character in ``chars`` (sorted, unique).

    Args:
        chars: the alphabet, e.g. ``"".join(sorted(set(text)))``.
        eos: reserve id ``len(chars)`` as an end-of-text symbol (``add_eos`` needs one).
    """

    name = "char"

    def transformers_files(self, model_max_length: int | None = None) -> dict[str, str]:
        """:func:`transformers_tokenizer_files` of this tokenizer (what an export writes for ``AutoTokenizer``)."""
        return transformers_tokenizer_files(self, model_max_length)

    def __init__(self, chars: str, eos: bool = False) -> None:
        if not chars:
            raise ValueError("character tokenizer needs a non-empty alphabet (is the text empty?)")
        if len(set(chars)) != len(chars):
            raise ValueError("character tokenizer alphabet has repeated characters")
        self.chars = chars
        self.stoi = {c: i for i, c in enumerate(chars)}
        self.eos_id = len(chars) if eos else None
        self.vocab_size = len(chars) + int(eos)
        self.fingerprint = _sha(json.dumps({"chars": chars, "eos": eos}))

    @classmethod
    def from_text(cls, text: str, eos: bool = False) -> "CharTokenizer":
        return cls("".join(sorted(set(text))), eos=eos)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        out = []
        for text in texts:
            try:
                out.append([self.stoi[c] for c in text])
            except KeyError as err:
                raise ValueError(f"character {err.args[0]!r} is not in the character vocabulary "
                                 f"({len(self.chars)} symbols built from the data)") from None
        return out

    def decode(self, ids: Sequence[int]) -> str:
        return "".join("" if int(i) == self.eos_id else self.chars[int(i)] for i in ids)

    def to_tokenizers(self, eos_token: str = DEFAULT_EOS_TOKEN):
        """The same encoding as a ``tokenizers.Tokenizer`` (what ``tokenizer.json`` holds).

        Every character is one token (a ``WordLevel`` vocabulary over the alphabet, split into single
        characters, newlines included) and decoding concatenates them; with ``eos``, ``eos_token`` is the
        special token of id ``len(chars)``. A character outside the alphabet is an error, as in
        :meth:`encode_batch`.
        """
        from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

        vocab = dict(self.stoi)
        if self.eos_id is not None:
            vocab[eos_token] = self.eos_id
        backend = Tokenizer(models.WordLevel(vocab, unk_token=None))
        backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
        backend.decoder = decoders.Fuse()
        if self.eos_id is not None:
            backend.add_special_tokens([AddedToken(eos_token, special=True, normalized=False)])
        return backend

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size})"


PIECE_CHARS = 1 << 20  # characters per tokenizer call for long texts (about 150 MB of tokenizer memory)


def safe_cut(text: str, limit: int) -> int:
    """A position in ``(limit // 2, limit]`` where ``text`` can be cut without changing its BPE ids
    (see the module docstring), or ``limit`` when there is none (text without spaces or newlines)."""
    lo = limit // 2
    for sep, after in (("\n", 1), (" ", 0)):
        i = text.rfind(sep, lo, limit)
        while i > lo:
            if not text[i - 1].isspace() and i + 1 < len(text) and not text[i + 1].isspace():
                return i + after
            i = text.rfind(sep, lo, i)
    return limit


def text_pieces(chunks: Iterable[str], max_chars: int = PIECE_CHARS) -> Iterator[str]:
    """The text of ``chunks`` (one document, in any chunking) as pieces of at most ``max_chars``
    characters cut at :func:`safe_cut` positions; always at least one piece (``""`` for no text)."""
    carry = ""
    for chunk in chunks:
        buf = carry + chunk if carry else chunk
        while len(buf) > max_chars:
            cut = safe_cut(buf, max_chars)
            yield buf[:cut]
            buf = buf[cut:]
        carry = buf
    yield carry


def _from_vocab_merges(vocab: str | os.PathLike, merges: str | os.PathLike, eos_token: str, name: str) -> BPETokenizer:
    from tokenizers import ByteLevelBPETokenizer

    for path, key in ((vocab, "vocab"), (merges, "merges")):
        if not Path(path).is_file():
            raise FileNotFoundError(f"dataset.tokenizer.{key}: file not found: {path}")
    bpe = ByteLevelBPETokenizer(str(vocab), str(merges))
    bpe.add_special_tokens([eos_token])  # so "<|endoftext|>" in text is one id, as in GPT-2
    return BPETokenizer(bpe._tokenizer, name, eos_token)


def load_tokenizer(spec: str | Mapping | os.PathLike, *, eos_token: str = DEFAULT_EOS_TOKEN) -> BPETokenizer:
    """Load a BPE tokenizer from a config value (``dataset.tokenizer``).

    ``spec`` may be:

    * a Hugging Face model name, e.g. ``"gpt2"`` (``AutoTokenizer``; needs the hub or its cache);
    * a local directory loadable by ``AutoTokenizer.from_pretrained`` (has ``tokenizer.json`` or
      ``tokenizer_config.json``), or holding only ``vocab.json`` + ``merges.txt``;
    * a ``tokenizer.json`` file;
    * a mapping ``{vocab: path/to/vocab.json, merges: path/to/merges.txt}``.

    Character-level tokenizers depend on the data and are built by the datamodule (``"char"``).
    """
    if isinstance(spec, Mapping):
        missing = {"vocab", "merges"} - set(spec)
        if missing:
            raise ValueError(f"dataset.tokenizer as a mapping needs keys 'vocab' and 'merges'; missing {sorted(missing)}")
        return _from_vocab_merges(spec["vocab"], spec["merges"], eos_token, name=f"{spec['vocab']}+{spec['merges']}")
    spec = str(spec)
    if spec == "char":
        raise ValueError("dataset.tokenizer='char' is built from the data by the datamodule, not by load_tokenizer")
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix != ".json":
            raise ValueError(f"dataset.tokenizer={spec!r}: a file must be a tokenizers 'tokenizer.json'")
        from tokenizers import Tokenizer

        try:
            backend = Tokenizer.from_file(str(path))
        except Exception as e:  # the Rust parser raises a bare Exception for malformed JSON or a wrong layout
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise ValueError(f"{path}: not a valid tokenizers 'tokenizer.json' ({first})") from None
        return BPETokenizer(backend, spec, eos_token)
    if path.is_dir():
        if (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file():
            return _from_auto(str(path), eos_token)
        if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
            return _from_vocab_merges(path / "vocab.json", path / "merges.txt", eos_token, name=spec)
        raise FileNotFoundError(f"dataset.tokenizer={spec!r} is a directory without tokenizer.json, "
                                "tokenizer_config.json or a vocab.json + merges.txt pair")
    if hub_tokenizer_name(spec) is None:
        raise FileNotFoundError(f"dataset.tokenizer={spec!r}: no such file or directory")
    return _from_auto(spec, eos_token)


def hub_tokenizer_name(spec) -> str | None:
    """``spec`` when :func:`load_tokenizer` would fetch it from the Hugging Face hub (``"gpt2"``,
    ``"org/name"``), ``None`` for local files, mappings and ``"char"``."""
    if isinstance(spec, Mapping) or spec is None:
        return None
    spec = str(spec)
    if spec == "char" or Path(spec).expanduser().exists():
        return None
    if spec.startswith((".", "/", "~")) or os.sep in spec and not _looks_like_hub_id(spec):
        return None
    return spec


def _looks_like_hub_id(spec: str) -> bool:
    parts = spec.split("/")
    return len(parts) == 2 and all(parts)


def _json_object(path: Path) -> dict:
    """The JSON object in ``path``, or ``{}`` when it holds something else (``AutoTokenizer`` then says what is wrong)."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _from_auto(name: str, eos_token: str) -> BPETokenizer:
    """``AutoTokenizer`` without custom code: a tokenizer that needs its own Python code (``auto_map``)
    is refused in one line, never run and never asked about on a terminal."""
    from transformers import AutoTokenizer

    local_config = Path(name) / "tokenizer_config.json"
    if local_config.is_file() and "auto_map" in _json_object(local_config):
        raise ValueError(f"dataset.tokenizer={name!r}: {local_config} names custom code (auto_map), which serengeti "
                         "never runs; point dataset.tokenizer at its tokenizer.json")
    try:
        tok = AutoTokenizer.from_pretrained(name, trust_remote_code=False)
    except OSError as err:
        raise OSError(f"dataset.tokenizer={name!r} could not be loaded with AutoTokenizer ({err}). Offline, point "
                      "dataset.tokenizer at a local directory with tokenizer.json or vocab.json + merges.txt") from err
    except ValueError as err:  # custom code on the hub (trust_remote_code=False refuses it), a bad config
        first = (str(err).strip().splitlines() or [""])[0]
        raise ValueError(f"dataset.tokenizer={name!r} could not be loaded without running its own code ({first})") from err
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"dataset.tokenizer={name!r} has no fast (Rust) backend; the pipeline needs one")
    return BPETokenizer(backend, name, eos_token)


def transformers_tokenizer_files(tokenizer: BPETokenizer | CharTokenizer, model_max_length: int | None = None) -> dict[str, str]:
    """``{file name: text}`` that ``transformers.AutoTokenizer.from_pretrained`` reads as a fast tokenizer
    encoding exactly as ``tokenizer`` does: ``tokenizer.json`` and ``tokenizer_config.json``.

    ``model_max_length``: the model's longest input (omitted: any length).
    """
    if isinstance(tokenizer, CharTokenizer):
        backend, eos_token = tokenizer.to_tokenizers(), DEFAULT_EOS_TOKEN if tokenizer.eos_id is not None else None
    else:
        backend, eos_token = tokenizer.backend, tokenizer.backend.id_to_token(tokenizer.eos_id)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
              "add_bos_token": False, "add_eos_token": False}
    if eos_token is not None:
        config["eos_token"] = eos_token
    if model_max_length is not None:
        config["model_max_length"] = int(model_max_length)
    return {"tokenizer.json": backend.to_str(), "tokenizer_config.json": json.dumps(config, indent=2, sort_keys=True) + "\n"}


# -- records: how checkpoints and exports name their tokenizer ------------------------------------

def tokenizer_record(tokenizer: Any, vocab_size: int | None = None) -> dict | None:
    """A JSON-able description of a datamodule's tokenizer, stored in checkpoints and exports
    (``None`` tokenizer with a ``vocab_size``: ``{"kind": "ids"}``; the kinds: :mod:`serengeti.io.checkpoint`)."""
    if tokenizer is None:
        return None if vocab_size is None else {"kind": "ids", "vocab_size": int(vocab_size)}
    if isinstance(tokenizer, CharTokenizer):
        return {"kind": "char", "chars": tokenizer.chars, "eos": tokenizer.eos_id is not None,
                "vocab_size": tokenizer.vocab_size, "fingerprint": tokenizer.fingerprint}
    if isinstance(tokenizer, BPETokenizer):
        eos_token = tokenizer.backend.id_to_token(tokenizer.eos_id)
        return {"kind": "bpe", "name": tokenizer.name, "eos_token": eos_token,
                "vocab_size": tokenizer.vocab_size, "fingerprint": tokenizer.fingerprint}
    log.warning("no tokenizer record for %s: the checkpoint will not know how to encode text", type(tokenizer).__name__)
    return None


def tokenizer_from_record(record: Mapping | None, root: str | os.PathLike | None = None, *, override: Any = None):
    """Rebuild a tokenizer. ``None`` for no record or an ``ids`` record (synthetic data).

    Args:
        record: from :func:`tokenizer_record`.
        root: an exported directory; a BPE record is read from its ``tokenizer.json`` only (the record's
            ``name``, a path or hub id, is used for ``.ckpt`` files of one's own training runs).
        override: a ``dataset.tokenizer``-style spec to load instead (e.g. a local GPT-2 directory).
    """
    if override is not None:
        eos = (record or {}).get("eos_token", DEFAULT_EOS_TOKEN)
        try:
            return load_tokenizer(override, eos_token=eos)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"tokenizer={override!r} could not be loaded ({first_line(e)})") from e
    if not record or record.get("kind") == "ids":
        return None
    kind = record.get("kind")
    if kind == "char":
        return CharTokenizer(record["chars"], eos=bool(record["eos"]))
    if kind != "bpe":
        raise CheckpointError(f"unknown tokenizer kind {kind!r} in the checkpoint's tokenizer record")
    if root is not None and not (Path(root) / TOKENIZER_NAME).is_file():  # an export names no place outside itself
        raise CheckpointError(f"{root} has no {TOKENIZER_NAME} (the tokenizer it records, {record.get('name')!r}, is not "
                              "looked up from an export): pass tokenizer=<local tokenizer directory or tokenizer.json>")
    spec = str(Path(root) / TOKENIZER_NAME) if root is not None else record["name"]
    try:
        tok = load_tokenizer(spec, eos_token=record.get("eos_token", DEFAULT_EOS_TOKEN))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"the checkpoint's tokenizer {spec!r} could not be loaded ({e}); "
                              "pass tokenizer=<local tokenizer directory or tokenizer.json>") from e
    if tok.vocab_size != record["vocab_size"]:
        raise CheckpointError(f"tokenizer {spec!r} has {tok.vocab_size} ids, the checkpoint was trained with "
                              f"{record['vocab_size']}")
    if tok.fingerprint != record.get("fingerprint"):
        log.warning("tokenizer %r differs in its serialisation from the one recorded at training time "
                    "(same vocabulary size %d)", spec, tok.vocab_size)
    return tok


def recorded_tokenizer(cfg: Mapping, root: str | os.PathLike | None = None) -> Any:
    """The tokenizer a config records, for writing its files into an export: the BPE tokenizer
    (``root``: the export holding ``tokenizer.json``) or the character vocabulary; ``None`` for id
    records and, with a warning, for a BPE tokenizer that cannot be loaded here.
    """
    if (cfg.get("tokenizer") or {}).get("kind") == "char":
        return tokenizer_from_record(cfg["tokenizer"])
    if (cfg.get("tokenizer") or {}).get("kind") != "bpe":
        return None
    try:
        return tokenizer_from_record(cfg["tokenizer"], root)
    except CheckpointError as e:
        log.warning("export without tokenizer.json: %s", e)
        return None
