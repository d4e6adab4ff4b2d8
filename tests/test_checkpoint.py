"""Checkpoint loading/export: round trips, tied weights, and clear errors for bad files."""
from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf

from conftest import compose_cfg
from serengeti.data.tokenizers import CharTokenizer, tokenizer_record
from serengeti.errors import CheckpointError
from serengeti.io.checkpoint import read_checkpoint, save_pretrained
from serengeti.models.pretrained import export, load_model
from serengeti.training.lm_task import build_model


def _cfg(tokenizer=None):
    cfg = compose_cfg(["model.vocab_size=10", "model.l_max=16"])
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    return {"model": model_cfg, "tokenizer": tokenizer or {"kind": "ids", "vocab_size": 10}}


def _write_ckpt(path, cfg, model):
    """The layout train.py's Lightning checkpoints have (LMTask stores the plain cfg)."""
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "hyper_parameters": {"cfg": cfg}, "global_step": 0}, path)


@pytest.fixture
def ckpt(tmp_path):
    torch.manual_seed(0)
    cfg = _cfg()
    model = build_model(cfg["model"])
    path = tmp_path / "m.ckpt"
    _write_ckpt(path, cfg, model)
    return path, model


def test_ckpt_and_export_round_trip(ckpt, tmp_path):
    path, ref = ckpt
    x = torch.randint(0, 10, (2, 16))
    ref.eval()
    model, cfg, tok = load_model(path)
    assert tok is None and cfg["tokenizer"]["kind"] == "ids"
    torch.testing.assert_close(model(x), ref(x), rtol=0, atol=0)
    out = export(path, tmp_path / "export")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir()), "no temp dir left behind"
    exported, cfg2, _ = load_model(out)
    torch.testing.assert_close(exported(x), ref(x), rtol=0, atol=0)
    assert exported.lm_head.weight is exported.word_embeddings.weight  # still tied after loading
    assert cfg2["model"] == cfg["model"]
    with pytest.raises(CheckpointError, match="already exists"):
        export(path, out)
    export(path, out, overwrite=True)


def test_char_tokenizer_travels_with_the_checkpoint(tmp_path):
    tok = CharTokenizer.from_text("hello world\n")
    cfg = _cfg(tokenizer_record(tok))
    model = build_model(cfg["model"])
    save_pretrained(model, cfg, tmp_path / "e")
    _, _, tok2 = load_model(tmp_path / "e")
    assert tok2.decode(tok2.encode_batch(["hello"])[0]) == "hello" and tok2.fingerprint == tok.fingerprint


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found: .*nope.ckpt"):
        load_model(tmp_path / "nope.ckpt")


def test_truncated_ckpt_names_the_file(ckpt, tmp_path):
    path, _ = ckpt
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="cut.ckpt: cannot read the checkpoint"):
        load_model(cut)


def test_pickled_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("executed",))

    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "x": Evil()}, path)
    with pytest.raises(CheckpointError, match="evil.ckpt: cannot read"):
        read_checkpoint(path)


def test_mismatched_weights_name_the_first_key(ckpt, tmp_path):
    path, model = ckpt
    cfg = _cfg()
    cfg["model"]["d_model"] = 32  # config no longer matches the weights
    bad = tmp_path / "bad.ckpt"
    _write_ckpt(bad, cfg, model)
    with pytest.raises(CheckpointError, match=r"bad.ckpt: .*first mismatching key 'word_embeddings.weight': shape"):
        load_model(bad)
    state = {k: v for k, v in model.state_dict().items() if k != "layers.1.mlp.fc2.bias"}
    torch.save({"state_dict": {f"model.{k}": v for k, v in state.items()}, "hyper_parameters": {"cfg": _cfg()}},
               tmp_path / "missing.ckpt")
    with pytest.raises(CheckpointError, match="first mismatching key 'layers.1.mlp.fc2.bias': missing"):
        load_model(tmp_path / "missing.ckpt")


def test_corrupt_export(ckpt, tmp_path):
    path, _ = ckpt
    out = export(path, tmp_path / "e")
    w = out / "model.safetensors"
    w.write_bytes(w.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="model.safetensors: cannot read the weights"):
        load_model(out)
    (out / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json: cannot parse"):
        load_model(out)
    (out / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_model(out)


def test_bpe_tokenizer_is_copied_into_the_export(shared_data, tmp_path):
    from serengeti.data.tokenizers import load_tokenizer

    tok = load_tokenizer(str(shared_data / "gpt2"))
    record = tokenizer_record(tok)
    assert record["kind"] == "bpe" and record["vocab_size"] == 50257
    cfg = _cfg(record)
    cfg["model"]["vocab_size"] = 50257
    torch.manual_seed(0)
    path = tmp_path / "bpe.ckpt"
    _write_ckpt(path, cfg, build_model(cfg["model"]))
    out = export(path, tmp_path / "e")
    assert (out / "tokenizer.json").is_file()
    record["name"] = str(tmp_path / "moved-away")  # the export must not need the original tokenizer files
    (out / "config.json").write_text(json.dumps({**json.loads((out / "config.json").read_text()), "tokenizer": record}))
    _, _, tok2 = load_model(out)
    text = "Hello world<|endoftext|>"
    assert tok2.encode_batch([text]) == tok.encode_batch([text]) and tok2.eos_id == 50256


def test_checkpoint_written_before_the_transformer_pp_options_loads_as_before(tmp_path):
    """A Transformer checkpoint whose config has no positions/norm/mlp keys (all written before them) loads
    with learned positions, LayerNorm and the GELU MLP and gives the saved model's outputs."""
    torch.manual_seed(0)
    cfg = compose_cfg(["model=transformer", "model.vocab_size=10", "model.l_max=16"])
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    for key in ("positions", "norm", "mlp"):
        model_cfg.pop(key)
    old = {"model": model_cfg, "tokenizer": {"kind": "ids", "vocab_size": 10}}
    ref = build_model(model_cfg).eval()
    _write_ckpt(tmp_path / "old.ckpt", old, ref)
    model, _, _ = load_model(tmp_path / "old.ckpt")
    assert model.positions == "learned" and isinstance(model.ln_f, torch.nn.LayerNorm)
    x = torch.randint(0, 10, (2, 16))
    torch.testing.assert_close(model(x), ref(x), rtol=0, atol=0)
