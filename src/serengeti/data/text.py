"""Language-modeling datamodules: WikiText, OpenWebText, the Pile, Tiny Shakespeare, your own text.

Every datamodule exposes ``vocab_size`` (the tokenizer's, before the model pads it) and ``l_max``
(= ``seq_len``) as soon as it is built, and yields ``(inputs, targets)`` batches, LongTensor
(B, seq_len) each, ``targets`` = inputs shifted by one, ``-100`` where nothing is scored.

Data flow: source documents -> tokenizer (+ EOS) -> one memory-mapped token stream per split in
``cache_dir`` (built once; see :mod:`serengeti.data.token_cache`) -> windows
(:mod:`serengeti.data.windows`). The Pile trains from a stream instead (:class:`Pile`).

Splits are named ``train``, ``validation`` and ``test``; ``train_split`` / ``val_split`` /
``test_split`` choose which one plays each role (e.g. ``train_split=validation`` to train on a
validation split when no train split is available offline — say so when you report numbers).
"""
from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from serengeti.data.hub import HubNeed, check_hub_needs, dataset_cached, tokenizer_cached
from serengeti.data.samplers import seeded_loader
from serengeti.data.sources import HFDataset, LocalFiles, read_text_file
from serengeti.data.token_cache import (TokenArray, build_locked, cache_paths, check_cache_name, ensure_tokens, read_cache,
                                        write_tokens)
from serengeti.data.tokenizers import CharTokenizer, DEFAULT_EOS_TOKEN, hub_tokenizer_name, load_tokenizer
from serengeti.data.windows import (
    EvalSampler,
    EvalWindows,
    PackedStream,
    TrainWindows,
    TrainWindowSampler,
    check_split_length,
)

log = logging.getLogger(__name__)

#: the config key that picks the source split playing each role (``dataset.train_split`` ...)
ROLE_KEYS = {role: f"{role}_split" for role in ("train", "val", "test")}

DEFAULT_CACHE_DIR = os.path.join(os.environ.get("SERENGETI_CACHE", os.path.expanduser("~/.cache/serengeti")))


def collate_pairs(items: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """[(inputs (L,), targets (L,))] * B -> (inputs (B, L), targets (B, L))."""
    inputs, targets = zip(*items)
    return torch.stack(inputs), torch.stack(targets)


class LMDataModule(pl.LightningDataModule):
    """Tokenize-once, memory-mapped language-modeling data from any document source.

    Args:
        source: a :class:`~serengeti.data.sources.LocalFiles` or :class:`~serengeti.data.sources.HFDataset`.
        seq_len: tokens per window (the model's ``l_max``).
        batch_size: training batch size per device.
        tokenizer: ``"gpt2"``, a local tokenizer directory / ``tokenizer.json`` / ``{vocab, merges}``
            (see :func:`~serengeti.data.tokenizers.load_tokenizer`), or ``"char"``.
        add_eos: append the EOS token after every non-empty document (line for WikiText).
        eos_token: the BPE end-of-text token.
        cache_dir: where token caches live (``<cache_dir>/<dataset name>/``).
        seed: seeds the training window offsets and order (per epoch).
        num_workers: DataLoader workers.
        batch_size_eval: evaluation batch size (default ``batch_size``).
        eval_stride: sliding-window evaluation stride (default ``seq_len``: non-overlapping).
        train_split, val_split, test_split: which source split plays each role (``null`` to skip).
        tokenize_batch_docs: documents per tokenizer call.
        max_eval_tokens: keep only the first this-many tokens of the evaluation splits.
        pin_memory: DataLoader ``pin_memory``.
        cache_wait_timeout_s: how long non-zero DDP ranks wait for rank 0's build.
        global_batch_size: sequences per optimizer step over all processes (``null``: no derivation);
            read at start-up by :mod:`serengeti.training.global_batch`, not by the datamodule.
    """

    def __init__(self, source, *, seq_len: int, batch_size: int, tokenizer: str | Mapping = "gpt2",
                 add_eos: bool = True, eos_token: str = DEFAULT_EOS_TOKEN, cache_dir: str | None = None,
                 seed: int = 0, num_workers: int = 0, batch_size_eval: int | None = None,
                 eval_stride: int | None = None, train_split: str | None = "train",
                 val_split: str | None = "validation", test_split: str | None = "test",
                 tokenize_batch_docs: int = 1024, max_eval_tokens: int | None = None, pin_memory: bool = False,
                 cache_wait_timeout_s: float = 6 * 3600, global_batch_size: int | None = None) -> None:
        super().__init__()
        self.global_batch_size = global_batch_size  # sequences per optimizer step; serengeti.training.global_batch derives accumulation
        if seq_len < 1:
            raise ValueError(f"dataset.seq_len must be >= 1, got {seq_len}")
        if batch_size < 1:
            raise ValueError(f"dataset.batch_size must be >= 1, got {batch_size}")
        if eval_stride is not None and not 1 <= eval_stride <= seq_len:
            raise ValueError(f"dataset.eval_stride={eval_stride} must be in [1, dataset.seq_len={seq_len}]")
        self.source = source
        check_cache_name(source.name)  # the cache folder: never outside cache_dir
        self._check_hub(tokenizer)  # offline: fail in seconds, naming dataset.path / dataset.tokenizer
        self.seq_len = self.l_max = int(seq_len)
        self.batch_size, self.batch_size_eval = int(batch_size), int(batch_size_eval or batch_size)
        self.add_eos, self.seed, self.num_workers = bool(add_eos), int(seed), int(num_workers)
        self.eval_stride, self.pin_memory = eval_stride, pin_memory
        self.cache_dir = os.path.expanduser(str(cache_dir or DEFAULT_CACHE_DIR))
        self.roles = {"train": train_split, "val": val_split, "test": test_split}
        self.tokenize_batch_docs, self.max_eval_tokens = int(tokenize_batch_docs), max_eval_tokens
        self.cache_wait_timeout_s = cache_wait_timeout_s
        for role in ("val", "test"):
            if train_split is not None and self.roles[role] == train_split:
                log.warning("dataset.train_split and dataset.%s_split both read the %r split of %s: %s scores the "
                            "training text", role, train_split, source.name, {"val": "validation", "test": "test"}[role])
        for role, split in self.roles.items():
            if split is not None and not source.has_split(split):
                raise FileNotFoundError(f"dataset.{role}_split={split!r}: {source.name} has no such split "
                                        f"({self._split_hint(split)})")
        self.tokenizer = self._make_tokenizer(tokenizer, eos_token)
        self.vocab_size = int(self.tokenizer.vocab_size)
        self.tokens: dict[str, TokenArray] = {}

    #: what ``dataset.path`` should point at offline (the error of :meth:`_check_hub` shows it)
    LOCAL_PATH_HINT = "<local copy of the data>"

    def _check_hub(self, tokenizer) -> None:
        needs = []
        if isinstance(self.source, HFDataset):
            needs.append(HubNeed("dataset.path", self.LOCAL_PATH_HINT, dataset_cached(self.source.hf_name)))
        name = hub_tokenizer_name(tokenizer)
        if name is not None:
            needs.append(HubNeed("dataset.tokenizer", "<dir with tokenizer.json, or vocab.json + merges.txt>",
                                 tokenizer_cached(name)))
        check_hub_needs(needs)

    @property
    def val_is_test(self) -> bool:
        """Whether the validation and test roles read the same split (train.py says so with its metrics)."""
        return self.roles["val"] is not None and self.roles["val"] == self.roles["test"]

    # -- tokenizer -------------------------------------------------------------------------
    def _make_tokenizer(self, spec, eos_token: str):
        if spec == "char":
            splits = [s for s in dict.fromkeys(self.roles.values()) if s is not None]
            chars: set[str] = set()  # the alphabet, read chunk by chunk (a large file is a TextStream)
            for split in splits:
                for doc in self.source.documents(split):
                    for chunk in [doc] if isinstance(doc, str) else doc:
                        chars.update(chunk)
            if not chars:
                raise ValueError(f"dataset {self.source.name}: the splits {splits} hold no text")
            return CharTokenizer("".join(sorted(chars)), eos=self.add_eos)
        return load_tokenizer(spec, eos_token=eos_token)

    def _split_hint(self, split: str) -> str:
        if split == "train":
            return "no train split is available; set dataset.train_split=validation to train on another split"
        return "check dataset.path / the split's files"

    def check_model_vocab(self, model_vocab_size: int) -> None:
        """Raise if the model's (padded) vocabulary cannot hold every token id of this dataset."""
        if model_vocab_size < self.vocab_size:
            raise ValueError(f"model.vocab_size={model_vocab_size} is smaller than the vocabulary of dataset.tokenizer="
                             f"{getattr(self.tokenizer, 'name', self.tokenizer)!r} ({self.vocab_size} ids)")

    # -- token cache -----------------------------------------------------------------------
    def _spec(self, split: str, max_tokens: int | None) -> dict:
        return {"source": self.source.identity(split), "split": split, "tokenizer": self.tokenizer.fingerprint,
                "add_eos": self.add_eos, "max_tokens": max_tokens}

    def _max_tokens(self, role: str) -> int | None:
        return self.max_eval_tokens if role != "train" else None

    def _cache(self, split: str, max_tokens: int | None):
        paths = cache_paths(self.cache_dir, self.source.name, split, self._spec(split, max_tokens))

        def build() -> dict:
            log.info("tokenizing %s/%s with %r into %s", self.source.name, split, self.tokenizer, paths.bin)
            meta = write_tokens(self.source.documents(split), self.tokenizer, paths, add_eos=self.add_eos,
                                spec=self._spec(split, max_tokens), batch_docs=self.tokenize_batch_docs,
                                max_tokens=max_tokens)
            log.info("%s/%s: %d tokens from %.1f MB in %.1f s (%.2f MB/s)", self.source.name, split, meta["num_tokens"],
                     meta["num_bytes"] / 1e6, meta["build_seconds"], meta["mb_per_s"])
            return meta

        return paths, build

    def _needed(self, stage: str | None) -> list[str]:
        roles = {"fit": ["train", "val"], "validate": ["val"], "test": ["test"], "predict": []}.get(stage or "", list(self.roles))
        return [r for r in roles if self.roles[r] is not None and self._cached_role(r)]

    def _cached_role(self, role: str) -> bool:
        return True

    def prepare_data(self) -> None:
        """Build missing caches (Lightning calls this on one process per node; no collectives here)."""
        for role in self._needed(None):
            paths, build = self._cache(self.roles[role], self._max_tokens(role))
            if read_cache(paths) is None:
                build_locked(paths, build)

    def load_split(self, role: str) -> TokenArray:
        """The token stream of a role (``train``/``val``/``test``), built if needed (DDP-safe)."""
        split = self.roles[role]
        if split is None:
            raise ValueError(f"dataset.{role}_split is null")
        paths, build = self._cache(split, self._max_tokens(role))
        arr = ensure_tokens(paths, build, wait_timeout_s=self.cache_wait_timeout_s)
        if len(arr) == 0:
            raise ValueError(f"dataset.{role}_split={split!r} of {self.source.name} is empty (0 tokens); "
                             "check dataset.path and the split's files")
        if arr.meta["vocab_size"] != self.vocab_size:
            raise ValueError(f"token cache {arr.path} was built for vocab_size {arr.meta['vocab_size']}, "
                             f"dataset.tokenizer has {self.vocab_size}")
        return arr

    def role_tokens(self, role: str):
        """``(N,)`` memory-mapped tokens of a role, loaded once and checked against ``seq_len``."""
        if role not in self.tokens:
            arr = self.load_split(role)
            check_split_length(len(arr), self.seq_len, f"dataset.{role}_split={self.roles[role]!r} ({arr.path})")
            self.tokens[role] = arr
        return self.tokens[role].tokens

    def setup(self, stage: str | None = None) -> None:
        for role in self._needed(stage):
            self.role_tokens(role)

    # -- loaders ---------------------------------------------------------------------------
    def _loader(self, dataset, sampler, batch_size: int, drop_last: bool) -> DataLoader:
        return seeded_loader(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
                          pin_memory=self.pin_memory, collate_fn=collate_pairs)

    def train_dataloader(self) -> DataLoader:
        windows = TrainWindows(self.role_tokens("train"), self.seq_len)
        sampler = TrainWindowSampler(windows, seed=self.seed, shuffle=True)
        if len(sampler) < self.batch_size:
            raise ValueError(f"the training split has {len(sampler)} windows of dataset.seq_len={self.seq_len} per rank, "
                             f"fewer than dataset.batch_size={self.batch_size}")
        return self._loader(windows, sampler, self.batch_size, drop_last=True)

    def _eval_loader(self, role: str) -> DataLoader:
        pad = self.tokenizer.eos_id if self.tokenizer.eos_id is not None else 0
        windows = EvalWindows(self.role_tokens(role), self.seq_len, self.eval_stride, pad_id=pad)
        return self._loader(windows, EvalSampler(windows), self.batch_size_eval, drop_last=False)

    def val_dataloader(self) -> DataLoader | list:
        return self._eval_loader("val") if self.roles["val"] is not None else []

    def test_dataloader(self) -> DataLoader | list:
        return self._eval_loader("test") if self.roles["test"] is not None else []


# -- concrete datasets -----------------------------------------------------------------------

_WIKITEXT_FILES = {  # .tokens: found only to be refused by name
    "train": ("wiki.train.raw", "train.txt", "wiki.train.tokens"),
    "validation": ("wiki.valid.raw", "valid.txt", "validation.txt", "wiki.valid.tokens"),
    "test": ("wiki.test.raw", "test.txt", "wiki.test.tokens"),
}


def wikitext_local_files(path: str | os.PathLike) -> dict[str, str]:
    """``{split: file}`` for a WikiText directory (``wiki.{train,valid,test}.raw`` or ``{train,valid,test}.txt``);
    splits without a file are left out. The pre-tokenized ``wiki.*.tokens`` release is refused, naming its files:
    its ``<unk>`` words would be scored as text."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"dataset.path={str(path)!r} is not a directory")
    found = {}
    for split, names in _WIKITEXT_FILES.items():
        for name in names:
            if (root / name).is_file():
                found[split] = str(root / name)
                break
    if not found:
        raise FileNotFoundError(f"dataset.path={str(path)!r} holds none of the WikiText files "
                                f"{[n for names in _WIKITEXT_FILES.values() for n in names]}")
    tokens = sorted(Path(f).name for f in found.values() if f.endswith(".tokens"))
    if tokens:
        raise ValueError(f"dataset.path={str(path)!r} holds the pre-tokenized WikiText files {', '.join(tokens)} "
                         "(word level, rare words replaced by <unk>), not the raw text wiki.*.raw that a BPE tokenizer "
                         "expects: point dataset.path at the raw release (wikitext-103-raw / wikitext-2-raw)")
    return found


class WikiText(LMDataModule):
    """WikiText-103 / WikiText-2 (one document per line, as the Hugging Face rows).

    Args:
        path: local directory with ``wiki.{train,valid,test}.raw`` (offline); ``None`` loads
            ``datasets.load_dataset(hf_name, hf_config)``.
        hf_name, hf_config: Hugging Face dataset (default ``wikitext`` / ``wikitext-103-raw-v1``).
        name: cache sub-directory (default: ``hf_config``).
        **kwargs: :class:`LMDataModule` arguments.
    """

    LOCAL_PATH_HINT = "<dir with wiki.{train,valid,test}.raw>"

    def __init__(self, path: str | None = None, hf_name: str = "wikitext", hf_config: str = "wikitext-103-raw-v1",
                 name: str | None = None, **kwargs) -> None:
        name = name or hf_config
        if path is not None:
            source = LocalFiles(name, wikitext_local_files(path), unit="line", key="dataset.path")
        else:
            source = HFDataset(name, hf_name, hf_config)
        super().__init__(source, **kwargs)


class TextFiles(LMDataModule):
    """Your own text: files or globs per split.

    Args:
        train, validation, test: a path, a glob or a list of them per split (``None``: absent).
        unit: ``"file"`` (a file is a document) or ``"line"`` (a line is a document).
        text_field: record field for ``.jsonl`` / ``.parquet`` files.
        val_ratio, val_seed: carve ``validation`` out of ``train`` by a seeded per-document hash
            when ``validation`` is not given.
        name: cache sub-directory.
        **kwargs: :class:`LMDataModule` arguments.
    """

    def __init__(self, train=None, validation=None, test=None, *, unit: str = "file", text_field: str = "text",
                 val_ratio: float | None = None, val_seed: int = 2357, name: str = "text_files", **kwargs) -> None:
        if not train and kwargs.get("train_split", "train") is not None:
            raise ValueError("dataset.train: give the training text (a path, a glob or a list of them)")
        splits = {"train": train, "validation": validation, "test": test}
        source = LocalFiles(name, splits, unit=unit, text_field=text_field, val_ratio=val_ratio, val_seed=val_seed)
        kwargs.setdefault("val_split", "validation" if validation or val_ratio is not None else None)
        kwargs.setdefault("test_split", "test" if test else None)
        super().__init__(source, **kwargs)


class OpenWebText(LMDataModule):
    """OpenWebText: one train split; validation carved out by hash (``val_ratio``, as the reference's 0.0005).

    Args:
        path: local files (a directory of ``.txt`` documents, ``.jsonl``/``.parquet`` files, or a
            glob); ``None`` loads ``hf_name`` from the hub.
        hf_name: Hugging Face dataset (default ``Skylion007/openwebtext``).
        val_ratio, val_seed: fraction of documents moved to validation, and its seed.
        **kwargs: :class:`LMDataModule` arguments (``test_split`` defaults to ``None``).
    """

    LOCAL_PATH_HINT = "<dir of .txt documents or .jsonl/.parquet files>"

    def __init__(self, path: str | None = None, hf_name: str = "Skylion007/openwebtext", *, text_field: str = "text",
                 val_ratio: float = 0.0005, val_seed: int = 2357, name: str = "openwebtext", **kwargs) -> None:
        if path is not None:
            pattern = os.path.join(path, "*") if os.path.isdir(os.path.expanduser(path)) else path
            source = LocalFiles(name, {"train": pattern}, unit="file", text_field=text_field, val_ratio=val_ratio,
                                val_seed=val_seed, key="dataset.path")
        else:
            source = HFDataset(name, hf_name, text_field=text_field, split_names={"train": "train"},
                               val_ratio=val_ratio, val_seed=val_seed)
        kwargs.setdefault("test_split", None)
        super().__init__(source, **kwargs)


class TinyShakespeare(LMDataModule):
    """Tiny Shakespeare, character level by default (65 symbols).

    Args:
        path: local ``input.txt``, split by characters into ``split_fractions`` (contiguous
            train / validation / test); ``None`` loads ``hf_name`` (``karpathy/tiny_shakespeare``,
            which has the three splits).
        split_fractions: train, validation and test fractions of the local file. ``[0.9, 0.1, 0]``
            is nanoGPT's split (train = the first ``int(0.9 * n)`` characters, validation = the
            rest); a role may not name a split that gets 0 of the text: with no test part, set
            ``test_split: validation`` (test on the validation part) or ``test_split: null``.
        **kwargs: :class:`LMDataModule` arguments; ``tokenizer`` defaults to ``"char"`` and
            ``add_eos`` to ``False`` (the text is one document).
    """

    LOCAL_PATH_HINT = "<input.txt>"

    def __init__(self, path: str | None = None, hf_name: str = "karpathy/tiny_shakespeare",
                 split_fractions: Sequence[float] = (0.9, 0.05, 0.05), name: str = "tinyshakespeare", **kwargs) -> None:
        kwargs.setdefault("tokenizer", "char")
        kwargs.setdefault("add_eos", False)
        if path is not None:
            source = FractionSplits(name, path, split_fractions)
            for role in ("train", "val", "test"):
                split = kwargs.get(f"{role}_split", {"val": "validation"}.get(role, role))
                if split is not None and not source.has_split(split):
                    raise ValueError(f"dataset.{role}_split={split!r} is empty: dataset.split_fractions="
                                     f"{list(split_fractions)} gives it no text; name a non-empty split or null")
        else:
            source = HFDataset(name, hf_name)
        super().__init__(source, **kwargs)


SPLIT_ORDER = ("train", "validation", "test")


class FractionSplits:
    """One text file cut by character position into contiguous train / validation / test parts."""

    def __init__(self, name: str, path: str | os.PathLike, fractions: Sequence[float]) -> None:
        self.name, self.path = name, Path(path).expanduser()
        if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
            raise ValueError(f"dataset.split_fractions must be three non-negative numbers summing to 1, got {list(fractions)}")
        if not self.path.is_file():
            raise FileNotFoundError(f"dataset.path: file not found: {self.path}")
        self.fractions = [float(f) for f in fractions]

    def has_split(self, split: str) -> bool:
        """Whether ``split`` is one of the three and gets a non-zero fraction of the text."""
        return split in SPLIT_ORDER and self.fractions[SPLIT_ORDER.index(split)] > 0

    def identity(self, split: str) -> dict:
        st = self.path.stat()
        return {"file": [str(self.path.resolve()), st.st_size, st.st_mtime_ns], "fractions": self.fractions,
                "cut": "floor"}

    @staticmethod
    def cuts(n: int, fractions: Sequence[float]) -> list[int]:
        """Character offsets ``[0, a, b, n]`` of the three parts: ``a = int(f0 * n)`` (nanoGPT's cut),
        ``b = int((f0 + f1) * n)``, or ``n`` when the test fraction is 0."""
        b = n if fractions[2] == 0 else min(n, int((fractions[0] + fractions[1]) * n))
        return [0, int(fractions[0] * n), b, n]

    def documents(self, split: str, shard: int = 0, num_shards: int = 1):
        text = read_text_file(self.path, f"dataset.path: the file {self.path}")
        cuts = self.cuts(len(text), self.fractions)
        i = SPLIT_ORDER.index(split)
        if shard == 0:
            yield text[cuts[i] : cuts[i + 1]]


class Pile(LMDataModule):
    """The Pile: training windows are packed from a document stream; validation/test are cached.

    Args:
        path: local directory in the Pile layout (``train/*.jsonl[.zst]``, ``val.jsonl[.zst]``,
            ``test.jsonl[.zst]``); ``None`` streams ``hf_name`` from the hub.
        hf_name: Hugging Face dataset (default ``monology/pile-uncopyrighted``).
        max_tokens: training token budget (over all ranks and workers); ``None``: the whole stream.
        shuffle_buffer: windows held by the bounded shuffle buffer of each stream shard.
        **kwargs: :class:`LMDataModule` arguments (``max_eval_tokens`` limits validation/test).
    """

    LOCAL_PATH_HINT = "<dir with train/*.jsonl.zst, val.jsonl.zst, test.jsonl.zst>"

    def __init__(self, path: str | None = None, hf_name: str = "monology/pile-uncopyrighted", *,
                 text_field: str = "text", max_tokens: int | None = None, shuffle_buffer: int = 1000,
                 name: str = "pile", **kwargs) -> None:
        if path is not None:
            root = Path(path).expanduser()
            if not root.is_dir():
                raise FileNotFoundError(f"dataset.path={path!r} is not a directory")
            splits = {"train": [str(root / "train" / "*.jsonl*")],
                      "validation": [str(root / "val.jsonl*")], "test": [str(root / "test.jsonl*")]}
            source = LocalFiles(name, splits, unit="file", text_field=text_field, key="dataset.path")
        else:
            source = HFDataset(name, hf_name, text_field=text_field, streaming=True)
        self.max_tokens, self.shuffle_buffer = max_tokens, shuffle_buffer
        super().__init__(source, **kwargs)

    def _cached_role(self, role: str) -> bool:
        return role != "train"

    def train_dataloader(self) -> DataLoader:
        split = self.roles["train"]
        stream = PackedStream(lambda shard, n: self.source.documents(split, shard, n), self.tokenizer, self.seq_len,
                              add_eos=self.add_eos, batch_docs=64, shuffle_buffer=self.shuffle_buffer,
                              max_tokens=self.max_tokens, seed=self.seed)
        return seeded_loader(stream, batch_size=self.batch_size, num_workers=self.num_workers, drop_last=True,
                          persistent_workers=False, pin_memory=self.pin_memory, collate_fn=collate_pairs)
