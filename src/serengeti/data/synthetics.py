"""Synthetic in-context-learning tasks (docs/mixers.md#synthetic-tasks), generated vectorised in torch.

Every generator returns ``(inputs, targets)`` int64 tensors of shape (N, l_max); ``targets``
use -100 for positions that are not scored. Training targets score every position (the
reference's loss); test targets score only what the task measures (the last token for
associative recall / induction head, the queried values for MQAR).
"""
from __future__ import annotations

import torch

from serengeti.data.targets import IGNORE_INDEX


class Vocab:
    """The reference's vocabulary: ``V - 2`` ordinary tokens "0".."V-3" plus "=>" and ".".

    Ids are positions in the lexicographically sorted list of the token strings, so "." -> 0,
    "0" -> 1, "1" -> 2, "10" -> 3, ... and "=>" -> V - 1.
    """

    COPY_PREFIX, NOOP = "=>", "."

    def __init__(self, vocab_size: int) -> None:
        if vocab_size < 4:
            raise ValueError(f"dataset.vocab_size must be >= 4 (two special tokens + keys and values), got {vocab_size}")
        self.size = vocab_size
        ordinary = [str(i) for i in range(vocab_size - 2)]
        self.tokens = sorted(ordinary + [self.COPY_PREFIX, self.NOOP])
        self.id = {t: i for i, t in enumerate(self.tokens)}
        ordinary_sorted = [t for t in self.tokens if t not in (self.COPY_PREFIX, self.NOOP)]
        half = len(ordinary_sorted) // 2
        self.ordinary = torch.tensor([self.id[t] for t in ordinary_sorted])
        self.keys = self.ordinary[:half]
        self.values = self.ordinary[half:]
        self.copy_prefix = self.id[self.COPY_PREFIX]

    def decode(self, ids) -> list[str]:
        return [self.tokens[int(i)] for i in ids]


def associative_recall(num_examples: int, vocab_size: int, seq_len: int, generator: torch.Generator) -> torch.Tensor:
    """Token sequences (N, seq_len + 3): ``seq_len // 2`` (key, value) pairs, then "=>", a seen key, its value.

    A fresh key -> value map per example (values drawn with replacement); pair keys uniform with
    replacement; the query key uniform over the keys that occurred.
    """
    if seq_len < 2 or seq_len % 2:
        raise ValueError(f"dataset.seq_len must be an even number >= 2 for associative recall, got {seq_len}")
    vocab = Vocab(vocab_size)
    n_keys, n_pairs = len(vocab.keys), seq_len // 2
    kv_map = torch.randint(len(vocab.values), (num_examples, n_keys), generator=generator)
    pair_keys = torch.randint(n_keys, (num_examples, n_pairs), generator=generator)
    pair_values = torch.gather(kv_map, 1, pair_keys)
    present = torch.zeros(num_examples, n_keys).scatter_(1, pair_keys, 1.0)
    query = torch.multinomial(present, 1, generator=generator)  # (N, 1), uniform over present keys
    answer = torch.gather(kv_map, 1, query)
    pairs = torch.stack([vocab.keys[pair_keys], vocab.values[pair_values]], dim=-1).flatten(1)
    tail = torch.cat([torch.full_like(query, vocab.copy_prefix), vocab.keys[query], vocab.values[answer]], dim=1)
    return torch.cat([pairs, tail], dim=1)


def recall_targets(tokens: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Targets (N, seq_len + 2) for associative-recall ``tokens`` (N, seq_len + 3) that score only recall: each
    pair's value whose key occurred in an earlier pair (its value is then determined by the context), and the
    final answer. Every other position is ``IGNORE_INDEX``.
    """
    keys = tokens[:, 0:seq_len:2].long()  # (N, P) the pairs' keys (token ids)
    pos = torch.arange(keys.shape[1]).expand_as(keys)
    first = torch.full((keys.shape[0], int(tokens.max()) + 1), keys.shape[1]).scatter_reduce(1, keys, pos, "amin")
    seen_before = torch.gather(first, 1, keys) < pos  # (N, P): this key already occurred in an earlier pair
    targets = torch.full_like(tokens[:, 1:], IGNORE_INDEX)
    values = tokens[:, 1:seq_len:2]  # target index 2p is token 2p + 1, the p-th value
    targets[:, 0:seq_len:2] = values.masked_fill(~seen_before, IGNORE_INDEX)
    targets[:, -1] = tokens[:, -1]
    return targets


def induction_head(num_examples: int, vocab_size: int, seq_len: int, generator: torch.Generator) -> torch.Tensor:
    """Token sequences (N, seq_len + 2): random ordinary tokens with one "=> t" inside, ending in "=> t"."""
    if seq_len < 3:
        raise ValueError(f"dataset.seq_len must be >= 3 for induction head, got {seq_len}")
    vocab = Vocab(vocab_size)
    ordinary = vocab.ordinary
    body = ordinary[torch.randint(len(ordinary), (num_examples, seq_len), generator=generator)]
    trigger = torch.randint(seq_len - 1, (num_examples, 1), generator=generator)  # "=>" at p, t at p + 1
    copied = torch.gather(body, 1, trigger + 1)
    body.scatter_(1, trigger, vocab.copy_prefix)
    return torch.cat([body, torch.full_like(copied, vocab.copy_prefix), copied], dim=1)


def mqar(num_examples: int, vocab_size: int, seq_len: int, num_kv_pairs: int, generator: torch.Generator,
         power_a: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """Multi-query associative recall (zoology): returns (inputs, targets), each (N, seq_len).

    Keys from [1, V/2), values from [V/2, V); ``num_kv_pairs`` distinct pairs first, then each key
    queried once at a power-law distributed gap; targets are the values after each query key.
    """
    context = 2 * num_kv_pairs
    if seq_len % 2 or vocab_size <= seq_len or context > seq_len or num_kv_pairs > vocab_size // 2 - 1:
        raise ValueError(
            "MQAR needs an even dataset.seq_len, dataset.vocab_size > seq_len and "
            f"2 * num_kv_pairs <= seq_len with enough keys; got seq_len={seq_len}, vocab_size={vocab_size}, num_kv_pairs={num_kv_pairs}"
        )
    half = vocab_size // 2
    key_pool = torch.rand(num_examples, half - 1, generator=generator).argsort(dim=1)[:, :num_kv_pairs] + 1
    values = torch.randint(half, vocab_size, (num_examples, num_kv_pairs), generator=generator)
    kvs = torch.stack([key_pool, values], dim=-1).flatten(1)
    space = (seq_len - context) // 2
    weights = power_a * torch.arange(1, space + 1, dtype=torch.float64) ** (power_a - 1)
    gaps = torch.multinomial(weights.expand(num_examples, space), num_kv_pairs, replacement=False, generator=generator)
    queries = torch.zeros(num_examples, seq_len - context + 1, dtype=torch.long).scatter_(1, 2 * gaps, key_pool)
    tokens = torch.cat([kvs, queries], dim=1)
    labels = torch.full_like(tokens, IGNORE_INDEX).scatter_(1, 2 * gaps + context + 1, values)
    inputs, targets = tokens[:, :-1].clone(), labels[:, 1:].contiguous()
    noise = torch.randint(vocab_size, inputs.shape, generator=generator)
    inputs = torch.where(inputs == 0, noise, inputs)
    return inputs, targets


def _dedupe_hash(tokens: torch.Tensor) -> torch.Tensor:
    """An int64 hash per row (wrapping arithmetic), for de-duplicating without sorting whole rows."""
    mult = torch.randint(1, 2**31 - 1, (tokens.shape[1],), generator=torch.Generator().manual_seed(1234)) * 2 + 1
    out = torch.zeros(tokens.shape[0], dtype=torch.long)
    for start in range(0, tokens.shape[1], 1 << 16):  # bounded memory for 131K-token rows
        out += (tokens[:, start:start + (1 << 16)].long() * mult[start:start + (1 << 16)]).sum(1)
    return out


def generate_unique(make, num_examples: int, generator: torch.Generator, max_rounds: int = 100) -> torch.Tensor:
    """Call ``make(n, generator) -> (n, T)`` until ``num_examples`` distinct rows exist (first occurrences kept)."""
    rows, hashes = [], set()
    missing = num_examples
    for _ in range(max_rounds):
        batch = make(missing, generator)
        keep = []
        for i, h in enumerate(_dedupe_hash(batch).tolist()):
            if h not in hashes:
                hashes.add(h)
                keep.append(i)
        rows.append(batch[keep])
        missing -= len(keep)
        if missing == 0:
            return torch.cat(rows)
    raise ValueError(
        f"could not draw {num_examples} distinct examples: the task has too few possible sequences "
        "(increase dataset.vocab_size or dataset.seq_len, or lower dataset.num_examples)"
    )
