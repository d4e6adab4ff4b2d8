"""LightningDataModule for the synthetic tasks (associative recall, induction head, MQAR)."""
from __future__ import annotations

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from serengeti.data import synthetics
from serengeti.data.samplers import EpochShuffleSampler, seeded_loader
from serengeti.data.targets import IGNORE_INDEX

TASKS = ("associative_recall", "induction_head", "mqar")


class _Pairs(Dataset):
    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        self.inputs, self.targets = inputs, targets

    def __len__(self) -> int:
        return self.inputs.shape[0]

    def __getitem__(self, i):
        return self.inputs[i].long(), self.targets[i].long()


def _compact(t: torch.Tensor) -> torch.Tensor:
    """Store token ids in the smallest dtype that holds them (131K-token sets stay small)."""
    if t.numel() == 0 or (t.min() >= 0 and t.max() < 256):  # empty: no training set (num_examples=0)
        return t.to(torch.uint8)
    if t.min() >= -32768 and t.max() < 32768:
        return t.to(torch.int16)
    return t


class SyntheticDataModule(pl.LightningDataModule):
    """Deterministic synthetic data: examples depend only on ``data_seed``; order on ``seed``.

    Batches are ``(inputs, targets)``, LongTensor (B, l_max); train targets score every position
    (``train_targets="all"``) or only the positions the context determines (``"recall"``; associative recall:
    the values whose key occurred earlier in the sequence, and the answer; induction head: the answer only);
    validation/test targets score only
    the measured ones. The validation set is the test set. ``num_examples=0`` draws no training set
    (scoring only: evaluate.py at another length than training, docs/evaluate.md).
    """

    #: validation and test score the same held-out examples (train.py says so next to its final metrics)
    val_is_test = True

    def __init__(self, task: str = "associative_recall", vocab_size: int = 10, seq_len: int = 64,
                 num_examples: int = 5000, num_test_examples: int = 500, batch_size: int = 32,
                 num_workers: int = 0, data_seed: int = 0, seed: int = 0, num_kv_pairs: int = 8,
                 train_targets: str = "all", global_batch_size: int | None = None) -> None:
        super().__init__()
        self.global_batch_size = global_batch_size  # sequences per optimizer step; serengeti.training.global_batch derives accumulation
        if task not in TASKS:
            raise ValueError(f"dataset.task must be one of {TASKS}, got {task!r}")
        if train_targets not in ("all", "recall") or (train_targets == "recall" and task == "mqar"):
            raise ValueError("dataset.train_targets must be 'all' (every next token, the reference's loss) or 'recall' "
                             "(associative_recall: the values whose key occurred before and the answer; induction_head: "
                             f"the answer), got {train_targets!r} for dataset.task={task!r}")
        self.train_targets = train_targets
        self.task, self.vocab_size, self.seq_len = task, vocab_size, seq_len
        self.num_examples, self.num_test_examples = num_examples, num_test_examples
        self.batch_size, self.num_workers = batch_size, num_workers
        self.data_seed, self.seed, self.num_kv_pairs = data_seed, seed, num_kv_pairs
        self.l_max = {"associative_recall": seq_len + 2, "induction_head": seq_len + 1, "mqar": seq_len}[task]
        self.train = self.test = None
        self._generate_examples(1, torch.Generator().manual_seed(0))  # invalid settings fail here, not mid-fit

    def _generate_examples(self, n: int, g: torch.Generator):
        if self.task == "mqar":
            return synthetics.mqar(n, self.vocab_size, self.seq_len, self.num_kv_pairs, g)
        make = {"associative_recall": synthetics.associative_recall, "induction_head": synthetics.induction_head}[self.task]
        return make(n, self.vocab_size, self.seq_len, g)

    def _generate(self) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        g = torch.Generator().manual_seed(self.data_seed)
        total = self.num_examples + self.num_test_examples
        if self.task == "mqar":
            inputs, targets = self._generate_examples(total, g)
            train = inputs[: self.num_examples], targets[: self.num_examples]
            test = inputs[self.num_examples:], targets[self.num_examples:]
            return train, test
        tokens = synthetics.generate_unique(self._generate_examples, total, g)
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        if self.train_targets == "recall" and self.task == "associative_recall":
            targets = synthetics.recall_targets(tokens, self.seq_len)
        elif self.train_targets == "recall":  # induction head: only the copied token after the final "=>"
            targets = torch.full_like(targets, IGNORE_INDEX).index_copy_(1, torch.tensor([targets.shape[1] - 1]),
                                                                         targets[:, -1:])
        test_targets = torch.full_like(targets[self.num_examples:], IGNORE_INDEX)
        test_targets[:, -1] = targets[self.num_examples:, -1]
        return (inputs[: self.num_examples], targets[: self.num_examples]), (inputs[self.num_examples:], test_targets)

    def setup(self, stage: str | None = None) -> None:
        if self.train is None:
            (tr_x, tr_y), (te_x, te_y) = self._generate()
            self.train = _Pairs(_compact(tr_x), _compact(tr_y))
            self.test = _Pairs(_compact(te_x), _compact(te_y))

    def train_dataloader(self) -> DataLoader:
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer is not None else (0, 1)
        sampler = EpochShuffleSampler(len(self.train), seed=self.seed, rank=rank, world_size=world)
        return seeded_loader(self.train, batch_size=self.batch_size, sampler=sampler, drop_last=True,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    def val_dataloader(self) -> DataLoader:
        return seeded_loader(self.test, batch_size=self.batch_size, num_workers=self.num_workers)

    test_dataloader = val_dataloader
