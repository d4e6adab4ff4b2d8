"""Hugging Face-style loading: LMHeadModel.from_pretrained / save_pretrained, serengeti.load_tokenizer.

Tiny BPE (GPT-2 tokenizer, WikiText-2 text) and char (Tiny Shakespeare) models are trained for a
few steps from ../shared/data; the tests skip when it is absent. The runs (:func:`shared_run`) are shared with
tests/test_lm_eval_adapter.py and tests/test_hf.py.
"""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch

from conftest import SHARED_DATA, compose_cfg

pytestmark = pytest.mark.usefixtures("one_thread")

_QUIET = ["logger=none", "trainer.enable_progress_bar=false", "~callbacks.rich_model_summary",
          "~callbacks.rich_progress_bar", "test_after_fit=false"]
_TINY = ["model=transformer", "model.d_model=16", "dataset.seq_len=32", "dataset.batch_size=4",
         "trainer.max_steps=3", "trainer.limit_train_batches=3", "dataset.max_eval_tokens=1024"]


def _need_shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared test data not found at {SHARED_DATA} (set SERENGETI_SHARED_DATA)")
    return SHARED_DATA


def bpe_dataset_overrides(data: Path, cache: Path) -> list[str]:
    """WikiText-2 raw (validation/test only: train on validation) with the local GPT-2 tokenizer."""
    return ["dataset=wikitext2", f"dataset.path={data / 'wikitext' / 'wikitext-2-raw'}",
            f"dataset.tokenizer={data / 'gpt2'}", "dataset.train_split=validation", f"paths.cache_dir={cache}"]


def char_dataset_overrides(data: Path, cache: Path) -> list[str]:
    return ["dataset=tinyshakespeare", f"dataset.path={data / 'tinyshakespeare' / 'input.txt'}",
            f"paths.cache_dir={cache}"]


def train_tiny(tmp: Path, kind: str) -> tuple[dict, Path, dict]:
    """Train a 2-layer d_model-16 Transformer for 3 steps; ``(final metrics, last.ckpt, composed cfg)``."""
    from omegaconf import OmegaConf

    from serengeti.training.run import run

    data = _need_shared_data()
    dataset = (bpe_dataset_overrides if kind == "bpe" else char_dataset_overrides)(data, tmp / "cache")
    cfg = compose_cfg(_QUIET + _TINY + dataset, output_dir=tmp / "run")
    metrics = run(cfg)
    return metrics, tmp / "run" / "checkpoints" / "last.ckpt", OmegaConf.to_container(cfg, resolve=True)


def shared_run(tmp_path_factory: pytest.TempPathFactory, kind: str) -> dict:
    """:func:`train_tiny` and ``evaluate.py task=export`` once per test run for ``kind``:
    ``{"metrics", "ckpt", "export_dir", "cfg"}``, shared by the test files and the pytest-xdist workers that ask for
    it (in the workers' common temporary directory: the first trains under a file lock, the others read what it
    wrote). Read-only for the tests: copy to change."""
    import fcntl

    from serengeti.models.pretrained import export

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the base the workers' own directories are in
    done = root / f"tiny_export_{kind}.json"
    with open(root / f"tiny_export_{kind}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.is_file():
            (root / f"tiny_export_{kind}").mkdir()
            metrics, ckpt, cfg = train_tiny(root / f"tiny_export_{kind}", kind)
            export_dir = export(ckpt, root / f"tiny_export_{kind}" / f"export_{kind}")
            done.write_text(json.dumps({"metrics": {k: float(v) for k, v in metrics.items()}, "ckpt": str(ckpt),
                                        "export_dir": str(export_dir), "cfg": cfg}))
    saved = json.loads(done.read_text())
    return {**saved, "ckpt": Path(saved["ckpt"]), "export_dir": Path(saved["export_dir"])}


@pytest.fixture(scope="module", params=["bpe", "char"])
def exported(request, tmp_path_factory):
    run = shared_run(tmp_path_factory, request.param)
    return request.param, run["metrics"], run["export_dir"], run["cfg"]


def _val_perplexity(model, cfg: dict) -> float:
    from serengeti.evaluate.perplexity import build_datamodule, evaluate_model

    datamodule = build_datamodule(model.pretrained_config["dataset"])
    return evaluate_model(model, model.pretrained_config, datamodule, split="val", device="cpu")["val/perplexity"]


def test_round_trip_reproduces_the_logged_perplexity(exported, tmp_path):
    from serengeti import LMHeadModel, load_tokenizer

    kind, metrics, export_dir, cfg = exported
    model = LMHeadModel.from_pretrained(export_dir)
    assert not model.training
    again = LMHeadModel.from_pretrained(model.save_pretrained(tmp_path / "copy"))
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
    # both vocabularies get the files transformers' AutoTokenizer reads (tests/test_hf.py)
    assert sorted(p.name for p in (tmp_path / "copy").iterdir()) == [
        "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    ppl = _val_perplexity(again, cfg)
    assert ppl == pytest.approx(metrics["val/perplexity"], rel=1e-4), "the perplexity train.py logged"

    tok = load_tokenizer(tmp_path / "copy")
    text = "ROMEO: the king" if kind == "char" else "The meaning of life is"
    assert tok.decode(tok.encode_batch([text])[0]) == text
    assert tok.vocab_size <= model.vocab_size


def test_load_tokenizer_of_a_training_checkpoint(tmp_path_factory):
    from serengeti import load_tokenizer

    tok = load_tokenizer(shared_run(tmp_path_factory, "char")["ckpt"])
    assert tok.decode(tok.encode_batch(["First Citizen:"])[0]) == "First Citizen:"


def test_five_line_snippet_generates(exported):
    from serengeti import LMHeadModel, generate, load_tokenizer

    kind, _, export_dir, _ = exported
    model = LMHeadModel.from_pretrained(export_dir)
    tokenizer = load_tokenizer(export_dir)
    ids = torch.tensor([tokenizer.encode_batch(["The "])[0]])
    out = generate(model, ids, 8, temperature=0.0).tokens[0].tolist()
    assert len(out) == 8 and all(0 <= t < model.vocab_size for t in out)
    assert isinstance(tokenizer.decode(out), str)


def test_save_pretrained_uses_the_umask(exported, tmp_path):
    from serengeti import LMHeadModel

    _, _, export_dir, _ = exported
    model = LMHeadModel.from_pretrained(export_dir)
    old = os.umask(0o027)
    try:
        out = model.save_pretrained(tmp_path / "perm")
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o750
    assert {stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {0o640}


def test_save_pretrained_needs_a_config():
    from serengeti.models.backbone import LMHeadModel, build_model

    model = build_model({"d_model": 8, "n_layer": 1, "vocab_size": 5, "l_max": 4,
                         "mixer": {"_target_": "serengeti.mixers.Attention", "_partial_": True, "num_heads": 1}})
    assert isinstance(model, LMHeadModel)
    with pytest.raises(ValueError, match="save_pretrained needs config="):
        model.save_pretrained("unused")


def test_hostile_config_is_refused(exported, tmp_path):
    """A config.json naming arbitrary code as the mixer is refused before anything is called."""
    import shutil

    from serengeti import LMHeadModel
    from serengeti.errors import CheckpointError

    _, _, export_dir, _ = exported
    bad = tmp_path / "bad"
    shutil.copytree(export_dir, bad)
    marker = tmp_path / "pwned"
    config = json.loads((bad / "config.json").read_text())
    config["model"]["mixer"] = {"_target_": "os.system", "_partial_": True, "command": f"touch {marker}"}
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="os.system"):
        LMHeadModel.from_pretrained(bad)
    assert not marker.exists()


@pytest.mark.parametrize("exported", ["bpe"], indirect=True)  # WikiText is GPT-2 BPE
def test_evaluate_on_a_dataset_without_train_split(exported, tmp_path):
    """``evaluate.py ckpt=EXPORT dataset=wikitext2 split=test``: the local copy has no train split,
    and evaluation does not ask for one (training would: dataset.train_split=validation)."""
    from conftest import compose_eval_cfg as eval_cfg

    from serengeti.evaluate.run import run as evaluate

    _, _, export_dir, _ = exported
    data = SHARED_DATA
    overrides = [f"ckpt={export_dir}", "dataset=wikitext2", f"dataset.path={data / 'wikitext' / 'wikitext-2-raw'}",
                 f"dataset.tokenizer={data / 'gpt2'}", "dataset.seq_len=32", "dataset.max_eval_tokens=512",
                 f"paths.cache_dir={tmp_path / 'cache'}"]
    res = evaluate(eval_cfg(overrides + ["split=test"], tmp_path / "e"))
    assert res["split"] == "test" and 1.0 < res["test/perplexity"] < 1e6
