"""Files written before the package-layout change still load and resume (tests/fixtures/pre_layout/).

The fixtures were written by the code with the flat ``src/serengeti/`` root (their README says how);
the ``_target_`` names such code stored in checkpoints and exports must stay resolvable.
"""
from __future__ import annotations

import logging
import shutil

import pytest
import torch

from conftest import ROOT, compose_cfg

FIXTURES = ROOT / "tests" / "fixtures" / "pre_layout"

#: the overrides that wrote fixtures/pre_layout/last.ckpt (train.py, step 3 of 6)
FIXTURE_RUN = ["logger=none", "trainer.enable_progress_bar=false", "callbacks.rich_model_summary=null",
               "callbacks.rich_progress_bar=null", "test_after_fit=false", "model.d_model=16", "model.n_layer=1",
               "dataset.num_examples=64", "dataset.num_test_examples=16", "dataset.batch_size=8",
               "scheduler.total_steps=6", "callbacks.model_checkpoint.every_n_train_steps=3"]

#: every ``_target_`` of a mixer or datamodule that configs, checkpoints and exports of the old layout held
#: (the configs' re-exports, and the module paths the registry accepted then)
OLD_TARGETS = [
    *(f"serengeti.mixers.{c}" for c in ("Attention", "H3", "S5", "Hyena", "LongConv", "HyenaS5")),
    "serengeti.mixers.attention.Attention", "serengeti.mixers.h3.H3", "serengeti.mixers.s5.S5",
    "serengeti.mixers.hyena.Hyena", "serengeti.mixers.long_conv.LongConv", "serengeti.mixers.hyena_s5.HyenaS5",
    *(f"serengeti.data.{c}" for c in ("SyntheticDataModule", "LMDataModule", "OpenWebText", "Pile", "TextFiles",
                                      "TinyShakespeare", "WikiText")),
    "serengeti.data.synthetic_datamodule.SyntheticDataModule",
    *(f"serengeti.data.lm.{c}" for c in ("LMDataModule", "OpenWebText", "Pile", "TextFiles", "TinyShakespeare",
                                         "WikiText")),
]


@pytest.mark.parametrize("target", OLD_TARGETS)
def test_targets_stored_by_the_old_layout_are_registered(target):
    import serengeti.data  # noqa: F401  (registers the datamodules)
    import serengeti.mixers  # noqa: F401
    from serengeti.registry import DATASETS, MIXERS

    assert target in MIXERS or target in DATASETS


@pytest.mark.parametrize("name", ["last.ckpt", "export"])
def test_old_checkpoint_and_export_load_with_the_same_logits(name):
    from serengeti import LMHeadModel, load_model, load_tokenizer

    expected = torch.load(FIXTURES / "expected_logits.pt", weights_only=True)
    model = LMHeadModel.from_pretrained(FIXTURES / name)
    with torch.no_grad():
        torch.testing.assert_close(model(expected["input_ids"]).float(), expected["logits"], rtol=0, atol=1e-6)
    _, cfg, tokenizer = load_model(FIXTURES / name)
    assert cfg["model"]["mixer"]["_target_"] == "serengeti.mixers.Hyena"
    assert cfg["dataset"]["_target_"] == "serengeti.data.SyntheticDataModule"
    assert tokenizer is None and load_tokenizer(FIXTURES / name) is None  # synthetic task: token ids


def test_a_last_ckpt_of_the_old_layout_resumes_mid_epoch(tmp_path, caplog, monkeypatch):
    """Weights-only load of every entry (callback states, exact-resume RNG tables, loops), the sampler
    skips the 3 batches the epoch had done, then 3 more steps."""
    from serengeti.data.samplers import ResumableSampler
    from serengeti.training.run import run

    skipped = []
    original = ResumableSampler.skip_next
    monkeypatch.setattr(ResumableSampler, "skip_next", lambda self, n: (skipped.append(n), original(self, n)))

    ckpt = tmp_path / "old-last.ckpt"
    shutil.copy(FIXTURES / "last.ckpt", ckpt)
    cfg = compose_cfg([*FIXTURE_RUN, "threads=1", "trainer.max_steps=6", f"ckpt_path={ckpt}"], output_dir=tmp_path / "run")
    with caplog.at_level(logging.WARNING, logger="serengeti"):
        run(cfg)
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 6
    assert skipped == [3 * 8]  # 3 batches of 8: resumed inside the epoch, not at its start
    assert not [r.message for r in caplog.records if "will not match" in r.message or "restarts" in r.message]
