"""Synthetic task generators: reference vocabulary, invariants, determinism, de-duplication."""
from __future__ import annotations

import pytest
import torch

from serengeti.data import SyntheticDataModule
from serengeti.data import synthetics as S


def test_vocab_is_lexicographic_like_the_reference():
    v = S.Vocab(30)
    assert v.tokens[:4] == [".", "0", "1", "10"] and v.tokens[-1] == "=>"
    assert v.copy_prefix == 29 and v.id["."] == 0
    assert v.decode(v.keys) == ["0", "1", "10", "11", "12", "13", "14", "15", "16", "17", "18", "19", "2", "20"]
    assert v.decode(v.values) == ["21", "22", "23", "24", "25", "26", "27", "3", "4", "5", "6", "7", "8", "9"]
    assert S.Vocab(10).decode(S.Vocab(10).keys) == ["0", "1", "2", "3"]


def test_associative_recall_invariants():
    g = torch.Generator().manual_seed(0)
    vocab = S.Vocab(20)
    tokens = S.associative_recall(300, 20, 40, g)
    assert tokens.shape == (300, 43)
    keys, values = set(vocab.keys.tolist()), set(vocab.values.tolist())
    for row in tokens.tolist():
        pairs = list(zip(row[0:40:2], row[1:40:2]))
        assert all(k in keys and v in values for k, v in pairs)
        mapping = {}
        for k, v in pairs:  # one value per key within an example
            assert mapping.setdefault(k, v) == v
        assert row[40] == vocab.copy_prefix
        assert row[41] in mapping, "the queried key appears earlier"
        assert row[42] == mapping[row[41]], "the target is its value"


def test_query_is_uniform_over_present_keys():
    g = torch.Generator().manual_seed(1)
    tokens = S.associative_recall(20000, 10, 2, g)  # one pair: the query must be that key
    assert torch.equal(tokens[:, 0], tokens[:, 3]) and torch.equal(tokens[:, 1], tokens[:, 4])


def test_induction_head_invariants():
    g = torch.Generator().manual_seed(0)
    vocab = S.Vocab(20)
    tokens = S.induction_head(200, 20, 30, g)
    assert tokens.shape == (200, 32)
    for row in tokens.tolist():
        body = row[:30]
        assert body.count(vocab.copy_prefix) == 1
        p = body.index(vocab.copy_prefix)
        assert row[30] == vocab.copy_prefix and row[31] == body[p + 1]


def test_mqar_invariants():
    g = torch.Generator().manual_seed(0)
    inputs, targets = S.mqar(50, 128, 64, 8, g)
    assert inputs.shape == targets.shape == (50, 64)
    for x, y in zip(inputs.tolist(), targets.tolist()):
        kv = dict(zip(x[0:16:2], x[1:16:2]))
        assert len(kv) == 8 and all(1 <= k < 64 <= v < 128 for k, v in kv.items())
        scored = [t for t in range(64) if y[t] != -100]
        assert len(scored) == 8
        for t in scored:
            assert t >= 16 and y[t] == kv[x[t]]


def test_datamodule_is_deterministic_and_deduplicated():
    a = SyntheticDataModule(vocab_size=10, seq_len=8, num_examples=200, num_test_examples=50)
    b = SyntheticDataModule(vocab_size=10, seq_len=8, num_examples=200, num_test_examples=50, seed=5)
    a.setup(), b.setup()
    assert torch.equal(a.train.inputs, b.train.inputs) and torch.equal(a.test.targets, b.test.targets)
    rows = torch.cat([a.train.inputs, a.test.inputs]).long()
    assert torch.unique(rows, dim=0).shape[0] == 250
    x, y = a.test[0]
    assert x.dtype == torch.long and (y[:-1] == -100).all() and y[-1] >= 0
    assert a.l_max == 10 and x.shape == (10,)
    train_x, train_y = a.train[0]
    assert torch.equal(train_x[1:], train_y[:-1]), "training targets are the next tokens at every position"


def test_recall_targets_match_a_python_loop():
    tokens = S.associative_recall(100, 30, 40, torch.Generator().manual_seed(3))
    targets = S.recall_targets(tokens, 40)
    for row, tgt in zip(tokens.tolist(), targets.tolist()):
        seen, expected = set(), []
        for i in range(len(row) - 1):  # target i is token i + 1
            if i < 40 and i % 2 == 0 and row[i] in seen:
                expected.append(row[i + 1])
            elif i == len(row) - 2:
                expected.append(row[-1])
            else:
                expected.append(-100)
            if i < 40 and i % 2 == 0:
                seen.add(row[i])
        assert tgt == expected


def test_datamodule_recall_targets_and_bad_setting():
    dm = SyntheticDataModule(vocab_size=30, seq_len=40, num_examples=50, num_test_examples=10, train_targets="recall")
    dm.setup()
    x, y = dm.train[0]
    scored = (y != -100).nonzero().flatten().tolist()
    assert scored[-1] == 41 and all(t % 2 == 0 for t in scored[:-1]) and len(scored) < 21
    assert all(y[t] == x[t + 1] for t in scored[:-1]), "scored targets are the next tokens"
    with pytest.raises(ValueError, match="dataset.train_targets"):
        SyntheticDataModule(task="mqar", vocab_size=64, seq_len=16, train_targets="recall")
    with pytest.raises(ValueError, match="dataset.train_targets"):
        SyntheticDataModule(train_targets="values")


def test_induction_head_recall_targets_score_only_the_answer():
    """train_targets=recall on induction head: the one determined target (the token after the final "=>",
    a copy of the token after the first) is scored, every other is ignored; the inputs are unchanged."""
    kw = dict(task="induction_head", vocab_size=16, seq_len=24, num_examples=40, num_test_examples=8)
    dm, ref = SyntheticDataModule(**kw, train_targets="recall"), SyntheticDataModule(**kw)
    dm.setup(), ref.setup()
    x, y = dm.train.inputs.long(), dm.train.targets.long()
    assert torch.equal(x, ref.train.inputs.long()) and torch.equal(dm.test.targets, ref.test.targets)
    assert (y[:, :-1] == -100).all() and torch.equal(y[:, -1], ref.train.targets.long()[:, -1])
    trigger = (x[:, :-1] == x[:, -1:]).long().argmax(1)  # the first "=>" (the last input is the final "=>")
    assert torch.equal(y[:, -1], x[torch.arange(len(x)), trigger + 1])
