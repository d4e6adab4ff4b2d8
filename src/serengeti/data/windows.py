"""Cutting a token stream into (inputs, targets) windows for causal language modeling.

A window of ``seq_len + 1`` consecutive tokens gives ``inputs = w[:-1]`` and ``targets = w[1:]``,
both ``(seq_len,)`` int64; ``-100`` in ``targets`` marks a position that is not scored.

* Training (:class:`TrainWindows` + :class:`TrainWindowSampler`): non-overlapping windows whose
  common start offset is drawn at random each epoch (so window boundaries move), visited in a
  random order; both depend only on ``(seed, epoch)``.
* Evaluation (:class:`EvalWindows` + :class:`EvalSampler`): every target of the split is scored
  exactly once. With ``stride == seq_len`` the windows are non-overlapping; with a smaller stride
  each window re-reads ``seq_len - stride`` tokens of context and scores only its last
  ``stride`` targets (sliding-window perplexity). The last window is padded.
* Streaming (:class:`PackedStream`): documents are tokenized on the fly and packed into windows
  through a bounded buffer, with an optional token budget.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler, IterableDataset, get_worker_info

from serengeti.data.samplers import ResumableSampler
from serengeti.data.targets import IGNORE_INDEX


def _dist_rank_world(num_replicas: int | None, rank: int | None) -> tuple[int, int]:
    if num_replicas is not None and rank is not None:
        return rank, num_replicas
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return (dist.get_rank() if rank is None else rank), (dist.get_world_size() if num_replicas is None else num_replicas)
    return (rank or 0), (num_replicas or 1)


def _as_long(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(a, dtype=np.int64))


def check_split_length(num_tokens: int, seq_len: int, what: str) -> None:
    """Raise if a split of ``num_tokens`` tokens cannot give one window of ``seq_len`` + 1 tokens."""
    if num_tokens < seq_len + 1:
        raise ValueError(f"dataset.seq_len={seq_len} is longer than the {what} ({num_tokens} tokens; "
                         f"a window needs seq_len + 1 = {seq_len + 1}). Lower dataset.seq_len or use a larger split")


def train_layout(num_tokens: int, seq_len: int) -> tuple[int, int]:
    """(windows per epoch, largest start offset) for a stream of ``num_tokens`` tokens.

    The count is the same every epoch so that schedules computed from ``len(loader)`` hold; the
    offset is drawn from ``[0, max_offset]``, with ``max_offset <= seq_len - 1``.
    """
    n = max(1, (num_tokens - seq_len) // seq_len)
    return n, min(seq_len - 1, num_tokens - 1 - n * seq_len)


class TrainWindows(Dataset):
    """Training windows indexed by their start position in the stream.

    Args:
        tokens: ``(N,)`` integer token stream (usually a ``np.memmap``).
        seq_len: window length L; item ``start`` is ``tokens[start : start + L + 1]``.

    ``dataset[start]`` returns ``(inputs, targets)``, each ``(L,)`` int64. Use with
    :class:`TrainWindowSampler`, which yields the start positions.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int) -> None:
        check_split_length(len(tokens), seq_len, "training split")
        self.tokens, self.seq_len = tokens, seq_len
        self.num_windows, self.max_offset = train_layout(len(tokens), seq_len)

    def __len__(self) -> int:
        return self.num_windows

    def __getitem__(self, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        w = _as_long(self.tokens[start : start + self.seq_len + 1])
        return w[:-1], w[1:]


class TrainWindowSampler(ResumableSampler, DistributedSampler):
    """Start positions of the training windows of one epoch, for this rank.

    Epoch ``e`` draws ``offset ~ U{0..max_offset}`` and a permutation of the windows from
    ``np.random.default_rng([seed, e])``; window ``i`` starts at ``offset + i * seq_len``. Every
    rank draws the same numbers and takes every ``world``-th window of the permutation (the tail
    is dropped so that all ranks take the same number of steps).

    It subclasses ``DistributedSampler`` so that Lightning neither wraps nor replaces it and calls
    ``set_epoch`` on it each epoch (``super().__init__`` is not called: it needs a process group).
    """

    def __init__(self, dataset: TrainWindows, *, seed: int = 0, shuffle: bool = True,
                 num_replicas: int | None = None, rank: int | None = None) -> None:
        self.dataset = dataset
        self.seed, self.shuffle, self.drop_last, self.epoch = int(seed), shuffle, True, 0
        self.rank, self.num_replicas = _dist_rank_world(num_replicas, rank)
        self.num_samples = dataset.num_windows // self.num_replicas
        if self.num_samples == 0:
            raise ValueError(f"the training split has {dataset.num_windows} windows of dataset.seq_len={dataset.seq_len}, "
                             f"fewer than the {self.num_replicas} ranks")
        self.total_size = self.num_samples * self.num_replicas

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_samples

    def epoch_starts(self, epoch: int) -> np.ndarray:
        """All ranks' window starts for ``epoch``: (num_windows,) int64."""
        rng = np.random.default_rng([self.seed, epoch])
        offset = int(rng.integers(0, self.dataset.max_offset + 1))
        n = self.dataset.num_windows
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        return offset + order.astype(np.int64) * self.dataset.seq_len

    def __iter__(self) -> Iterator[int]:
        starts = self.epoch_starts(self.epoch)[: self.total_size]
        return self._resumed(starts[self.rank :: self.num_replicas].tolist())


def eval_layout(num_tokens: int, seq_len: int, stride: int) -> int:
    """Number of evaluation windows so that targets 1 .. N-1 are each scored once."""
    if not 1 <= stride <= seq_len:
        raise ValueError(f"dataset.eval_stride={stride} must be in [1, dataset.seq_len={seq_len}]")
    return 1 + math.ceil(max(0, num_tokens - 1 - seq_len) / stride)


class EvalWindows(Dataset):
    """Evaluation windows that score every target of the stream exactly once.

    Args:
        tokens: ``(N,)`` token stream.
        seq_len: window length L.
        stride: distance S between window starts (default L: non-overlapping windows). Window
            ``i`` starts at ``i * S``; it scores all its targets if ``i == 0`` and otherwise only
            the last S (the others were scored by window ``i - 1``; here they are context).
        pad_id: input id used to pad the last window (its targets there are -100).

    ``dataset[i]`` returns ``(inputs, targets)``, each ``(L,)`` int64.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, stride: int | None = None, pad_id: int = 0) -> None:
        if len(tokens) < 2:
            raise ValueError(f"an evaluation split needs at least 2 tokens, got {len(tokens)}")
        self.tokens, self.seq_len = tokens, seq_len
        self.stride = seq_len if stride is None else int(stride)
        self.num_windows = eval_layout(len(tokens), seq_len, self.stride)
        self.pad_id = pad_id

    def __len__(self) -> int:
        return self.num_windows

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= i < self.num_windows:
            raise IndexError(i)
        L, start = self.seq_len, i * self.stride
        w = _as_long(self.tokens[start : start + L + 1])
        inputs = torch.full((L,), self.pad_id, dtype=torch.long)
        targets = torch.full((L,), IGNORE_INDEX, dtype=torch.long)
        inputs[: len(w) - 1] = w[:-1]
        targets[: len(w) - 1] = w[1:]
        if i > 0:
            targets[: L - self.stride] = IGNORE_INDEX
        return inputs, targets

    def num_scored(self) -> int:
        """Number of scored targets over all windows (= N - 1)."""
        return len(self.tokens) - 1


class EvalSampler(DistributedSampler):
    """Window indices for this rank: ``rank, rank + world, ...``, without the padding by repetition
    that ``DistributedSampler`` adds (which would score some tokens twice). Ranks may get one
    window more or less than each other. Subclasses ``DistributedSampler`` so Lightning keeps it."""

    def __init__(self, dataset: EvalWindows, *, num_replicas: int | None = None, rank: int | None = None) -> None:
        self.dataset = dataset
        self.shuffle, self.drop_last, self.epoch, self.seed = False, False, 0, 0
        self.rank, self.num_replicas = _dist_rank_world(num_replicas, rank)
        self.num_samples = len(range(self.rank, len(dataset), self.num_replicas))
        self.total_size = len(dataset)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, len(self.dataset), self.num_replicas))


class PackedStream(IterableDataset):
    """Pack a stream of documents into training windows on the fly.

    Args:
        documents: ``documents(shard, num_shards)`` yields the texts of one shard (shard = this
            rank and DataLoader worker; shards are disjoint and together cover the source).
        tokenizer: object with ``encode_batch`` and ``eos_id`` (see ``serengeti.data.tokenizers``).
        seq_len: window length L; yields ``(inputs, targets)``, each ``(L,)`` int64.
        add_eos: append the EOS id after every non-empty document.
        batch_docs: documents tokenized per call (the token buffer holds at most L tokens plus
            one batch).
        shuffle_buffer: if > 0, windows pass through a buffer of this many windows and leave it
            in a random order (seeded by ``seed``, the epoch and the shard); memory is bounded by
            ``shuffle_buffer * (L + 1)`` tokens.
        max_tokens: stop after this many target tokens in total, split evenly over the shards.
        seed: base seed for the shuffle buffer; call ``set_epoch`` to vary it.
    """

    def __init__(self, documents: Callable[[int, int], Iterable[str]], tokenizer, seq_len: int, *,
                 add_eos: bool = True, batch_docs: int = 64, shuffle_buffer: int = 0,
                 max_tokens: int | None = None, seed: int = 0) -> None:
        if add_eos and tokenizer.eos_id is None:
            raise ValueError(f"dataset.add_eos=true but the tokenizer {tokenizer!r} has no end-of-text token")
        if max_tokens is not None and max_tokens < seq_len:
            raise ValueError(f"dataset.max_tokens={max_tokens} is smaller than dataset.seq_len={seq_len}")
        self.documents, self.tokenizer, self.seq_len = documents, tokenizer, seq_len
        self.add_eos, self.batch_docs, self.shuffle_buffer = add_eos, batch_docs, shuffle_buffer
        self.max_tokens, self.seed, self.epoch = max_tokens, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _shard(self) -> tuple[int, int]:
        rank, world = _dist_rank_world(None, None)
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        return rank * workers + worker, world * workers

    def _windows(self, docs: Iterable[str], budget: int | None) -> Iterator[np.ndarray]:
        L = self.seq_len
        buf = np.zeros(0, dtype=np.int64)
        emitted = 0
        it = iter(docs)
        while True:
            batch = list(itertools.islice(it, self.batch_docs))
            if not batch:
                return
            pieces = [buf]
            for text, ids in zip(batch, self.tokenizer.encode_batch(batch)):
                if text:
                    pieces.append(np.asarray(ids, dtype=np.int64))
                    if self.add_eos:
                        pieces.append(np.asarray([self.tokenizer.eos_id], dtype=np.int64))
            buf = np.concatenate(pieces)
            n = (len(buf) - 1) // L  # windows available; consecutive windows share one token
            if budget is not None:
                n = min(n, (budget - emitted) // L)
            for k in range(n):
                yield buf[k * L : k * L + L + 1]
            emitted += n * L
            buf = buf[n * L :].copy()
            if budget is not None and budget - emitted < L:
                return

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        shard, num_shards = self._shard()
        budget = None if self.max_tokens is None else self.max_tokens // num_shards
        windows = self._windows(self.documents(shard, num_shards), budget)
        if self.shuffle_buffer > 0:
            windows = _shuffle(windows, self.shuffle_buffer, np.random.default_rng([self.seed, self.epoch, shard]))
        for w in windows:
            t = torch.from_numpy(w)
            yield t[:-1], t[1:]


def _shuffle(items: Iterator[np.ndarray], size: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """Bounded-buffer shuffle: keep ``size`` items, emit a random one for each new item."""
    buffer: list[np.ndarray] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        j = int(rng.integers(size))
        yield buffer[j]
        buffer[j] = item
    rng.shuffle(buffer)
    yield from buffer
