"""Windows over token streams: evaluation scores every token once, training windows by (seed, epoch), packing."""
from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
import pytest
import torch

from serengeti.data.tokenizers import CharTokenizer
from serengeti.data.windows import (
    IGNORE_INDEX,
    EvalSampler,
    EvalWindows,
    PackedStream,
    TrainWindows,
    TrainWindowSampler,
)


def _scored_positions(windows: EvalWindows, indices) -> list[int]:
    """Global stream positions of every scored target, checking each target's value on the way."""
    tokens = np.asarray(windows.tokens)
    out = []
    for i in indices:
        x, y = windows[i]
        start = i * windows.stride
        assert x.shape == y.shape == (windows.seq_len,)
        for j in torch.nonzero(y != IGNORE_INDEX).flatten().tolist():
            pos = start + j + 1
            assert y[j].item() == tokens[pos]
            assert x[j].item() == tokens[pos - 1]
            out.append(pos)
    return out


@pytest.mark.parametrize("n", [9, 16, 17, 18, 100, 101])
@pytest.mark.parametrize("seq_len,stride", [(8, 8), (8, 3), (8, 1), (5, 4)])
def test_eval_windows_score_every_token_exactly_once(n, seq_len, stride):
    tokens = np.random.default_rng(n).integers(0, 1000, size=n).astype(np.uint16)
    windows = EvalWindows(tokens, seq_len, stride, pad_id=7)
    positions = _scored_positions(windows, range(len(windows)))
    assert sorted(positions) == list(range(1, n)), "each target 1..N-1 exactly once"
    assert windows.num_scored() == n - 1
    # context-free first window, and every later window has seq_len - stride context positions
    if len(windows) > 1:
        _, y1 = windows[1]
        assert (y1[: seq_len - stride] == IGNORE_INDEX).all()


def test_eval_windows_split_across_ranks_without_duplicates():
    tokens = np.arange(1000, dtype=np.uint16)
    windows = EvalWindows(tokens, 16)
    per_rank = [list(EvalSampler(windows, num_replicas=3, rank=r)) for r in range(3)]
    counts = Counter(itertools.chain.from_iterable(per_rank))
    assert sorted(counts) == list(range(len(windows))) and set(counts.values()) == {1}
    assert [len(EvalSampler(windows, num_replicas=3, rank=r)) for r in range(3)] == [len(p) for p in per_rank]
    positions = _scored_positions(windows, itertools.chain.from_iterable(per_rank))
    assert sorted(positions) == list(range(1, 1000))


def test_eval_stride_out_of_range():
    with pytest.raises(ValueError, match="eval_stride"):
        EvalWindows(np.arange(100), 8, stride=9)


@pytest.mark.parametrize("n,seq_len", [(1000, 16), (33, 16), (17, 16), (4097, 64)])
def test_train_windows_are_disjoint_shifted_and_seeded(n, seq_len):
    tokens = np.arange(n, dtype=np.uint32)
    ds = TrainWindows(tokens, seq_len)
    sampler = TrainWindowSampler(ds, seed=3)
    starts = []
    for s in sampler:
        x, y = ds[s]
        assert x.tolist() == list(range(s, s + seq_len)) and y.tolist() == list(range(s + 1, s + seq_len + 1))
        starts.append(s)
    starts.sort()
    assert len(starts) == len(ds) >= 1
    assert all(b - a == seq_len for a, b in zip(starts, starts[1:])), "non-overlapping targets, one offset"
    assert 0 <= starts[0] < seq_len and starts[-1] + seq_len + 1 <= n
    again = TrainWindowSampler(ds, seed=3)
    assert list(again) == list(sampler), "deterministic by (seed, epoch)"


def test_train_windows_change_with_epoch_and_seed():
    ds = TrainWindows(np.arange(10_000, dtype=np.uint16), 32)
    sampler = TrainWindowSampler(ds, seed=0)
    epochs = []
    for e in range(4):
        sampler.set_epoch(e)
        epochs.append(list(sampler))
    assert len({tuple(e) for e in epochs}) == 4
    assert len({min(e) for e in epochs}) > 1, "window offsets move between epochs"
    other = TrainWindowSampler(ds, seed=1)
    assert list(other) != epochs[0]


def test_train_sampler_ranks_are_disjoint_and_equal():
    ds = TrainWindows(np.arange(5000, dtype=np.uint16), 16)
    ranks = [TrainWindowSampler(ds, seed=5, num_replicas=2, rank=r) for r in range(2)]
    for r in ranks:
        r.set_epoch(2)
    a, b = list(ranks[0]), list(ranks[1])
    assert len(a) == len(b) == len(ranks[0]) == len(ds) // 2
    assert not set(a) & set(b)


def test_seq_len_longer_than_split():
    with pytest.raises(ValueError, match=r"dataset.seq_len=64 is longer than the training split \(40 tokens"):
        TrainWindows(np.arange(40), 64)


def _docs(n_docs: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return ["".join(rng.choice(list("abcdefgh"), size=int(rng.integers(0, 40)))) for _ in range(n_docs)]


def _stream(tok: CharTokenizer, docs: list[str]) -> list[int]:
    out = []
    for d in docs:
        if d:
            out += tok.encode_batch([d])[0] + [tok.eos_id]
    return out


def test_packed_stream_reproduces_the_token_stream():
    docs = _docs(200)
    tok = CharTokenizer("abcdefgh", eos=True)
    stream = PackedStream(lambda shard, n: iter(docs), tok, 16, batch_docs=7)
    windows = list(stream)
    expected = _stream(tok, docs)
    assert len(windows) == (len(expected) - 1) // 16
    rebuilt = [t for x, _ in windows for t in x.tolist()] + [windows[-1][1][-1].item()]
    assert rebuilt == expected[: len(rebuilt)]
    for x, y in windows:
        assert x[1:].tolist() == y[:-1].tolist()


def test_packed_stream_budget_and_bounded_shuffle():
    docs = _docs(300, seed=1)
    tok = CharTokenizer("abcdefgh", eos=True)
    plain = [x for x, _ in PackedStream(lambda s, n: iter(docs), tok, 8, max_tokens=200)]
    assert len(plain) == 200 // 8
    shuffled = [x for x, _ in PackedStream(lambda s, n: iter(docs), tok, 8, max_tokens=200, shuffle_buffer=5, seed=4)]
    key = lambda t: tuple(t.tolist())  # noqa: E731
    assert sorted(map(key, shuffled)) == sorted(map(key, plain)) and list(map(key, shuffled)) != list(map(key, plain))


def test_packed_stream_needs_eos_when_add_eos():
    with pytest.raises(ValueError, match="add_eos"):
        PackedStream(lambda s, n: iter([]), CharTokenizer("ab"), 8)
