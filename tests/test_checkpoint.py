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


# -- what a loaded checkpoint must be (weights, stored config, tokenizer record) ------------------

def _altered(ckpt, tmp_path, name, change):
    path, _ = ckpt
    c = torch.load(path, weights_only=True)
    change(c)
    torch.save(c, tmp_path / name)
    return tmp_path / name


W = "model.word_embeddings.weight"


@pytest.mark.parametrize("name,change,message", [
    ("nan.ckpt", lambda c: c["state_dict"][W].__setitem__((0, 0), float("nan")),
     r"nan.ckpt: tensor 'word_embeddings.weight' holds NaN or Inf \(1 of \d+ values\)"),
    ("inf.ckpt", lambda c: c["state_dict"][W].__setitem__((1, 2), float("-inf")), "holds NaN or Inf"),
    ("bool.ckpt", lambda c: c["state_dict"].__setitem__(W, c["state_dict"][W] > 0),
     r"bool.ckpt: .*'word_embeddings.weight': torch.bool in the checkpoint, the model expects a floating-point"),
    ("complex.ckpt", lambda c: c["state_dict"].__setitem__(W, c["state_dict"][W].to(torch.complex64)),
     "torch.complex64 in the checkpoint, the model expects a floating-point"),
    ("eps.ckpt", lambda c: c["hyper_parameters"]["cfg"]["model"].__setitem__("layer_norm_epsilon", float("nan")),
     r"eps.ckpt: model.layer_norm_epsilon=nan in the stored config: expected a finite number"),
    ("drop.ckpt", lambda c: c["hyper_parameters"]["cfg"]["model"].__setitem__("resid_dropout", float("inf")),
     r"model.resid_dropout=inf in the stored config"),
    ("tok.ckpt", lambda c: c["hyper_parameters"]["cfg"].__setitem__("tokenizer", {"kind": "bpe"}),
     r"tok.ckpt: tokenizer.name=None \(kind bpe\): expected a tokenizer name"),
    ("tok2.ckpt", lambda c: c["hyper_parameters"]["cfg"].__setitem__("tokenizer", {"kind": "char", "chars": "ab"}),
     r"tokenizer.eos=None \(kind char\): expected true or false"),
    ("tok3.ckpt", lambda c: c["hyper_parameters"]["cfg"].__setitem__("tokenizer", ["bpe"]),
     "the tokenizer record is a list, expected a mapping"),
])
def test_bad_weights_config_values_and_tokenizer_records_are_refused_naming_the_file(ckpt, tmp_path, name, change,
                                                                                      message):
    bad = _altered(ckpt, tmp_path, name, change)
    with pytest.raises(CheckpointError, match=message) as e:
        load_model(bad)
    assert "\n" not in str(e.value)
    with pytest.raises(CheckpointError, match=message):
        export(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_an_export_with_nan_weights_is_refused(ckpt, tmp_path):
    from safetensors.torch import load_file, save_file

    out = export(ckpt[0], tmp_path / "e")
    tensors = load_file(str(out / "model.safetensors"))
    tensors["word_embeddings.weight"][3, 3] = float("nan")
    save_file(tensors, str(out / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"model.safetensors|/e: tensor 'word_embeddings.weight' holds NaN"):
        load_model(out)


def test_a_resumed_checkpoint_is_checked_against_the_model_naming_keys_and_file(ckpt, tmp_path):
    from serengeti.training.checkpoint_policy import SafeCheckpointIO

    path, model = ckpt
    module = torch.nn.Module()
    module.model = model  # the LightningModule's layout: weights under "model."
    io = SafeCheckpointIO(module)
    assert io.load_checkpoint(path)["state_dict"].keys() == module.state_dict().keys()

    def damage(c):
        del c["state_dict"]["model.layers.0.mlp.fc1.bias"]
        c["state_dict"]["model.extra.weight"] = torch.zeros(2)
        c["state_dict"]["model.layers.1.mlp.fc2.bias"] = torch.zeros(3)

    bad = _altered(ckpt, tmp_path, "resume.ckpt", damage)
    with pytest.raises(CheckpointError, match=(
            r"resume.ckpt: weights do not match .* first mismatching key 'model.layers.0.mlp.fc1.bias': missing .*"
            r"in all: 1 missing \(model.layers.0.mlp.fc1.bias\); 1 unexpected \(model.extra.weight\); "
            r"1 mis-shaped \(model.layers.1.mlp.fc2.bias\)")):
        io.load_checkpoint(bad)
    nan = _altered(ckpt, tmp_path, "nan.ckpt", lambda c: c["state_dict"][W].__setitem__((0, 0), float("nan")))
    with pytest.raises(CheckpointError, match="nan.ckpt: tensor 'model.word_embeddings.weight' holds NaN"):
        SafeCheckpointIO().load_checkpoint(nan)


def test_a_malformed_tokenizer_json_is_one_line_naming_it(tmp_path, capsys):
    from serengeti.data.tokenizers import tokenizer_from_record
    from serengeti.convert import main as convert_main
    from serengeti.data.tokenizers import load_tokenizer

    bad = tmp_path / "tokenizer.json"
    bad.write_text('{"model": {"type": "BPE", "vocab": ')
    with pytest.raises(ValueError, match=f"^{bad}: not a valid tokenizers 'tokenizer.json' "):
        load_tokenizer(bad)
    with pytest.raises(CheckpointError, match=f"{bad}: not a valid tokenizers") as e:
        tokenizer_from_record({"kind": "ids", "vocab_size": 10}, override=str(bad))
    assert "\n" not in str(e.value)
    assert convert_main(["--from", "safari-hyena", str(tmp_path / "x.pt"), str(tmp_path / "o"),
                         "--tokenizer", str(bad)]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_a_full_disk_names_the_directory_and_leaves_nothing(ckpt, tmp_path, monkeypatch):
    import errno

    import safetensors.torch

    from serengeti.io.atomic import atomic_write

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match=f"no space left on {tmp_path} \\(writing last.ckpt\\)"):
        atomic_write(tmp_path / "last.ckpt", full)
    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(CheckpointError, match=f"out={tmp_path / 'e'}: no space left on {tmp_path} "):
        export(ckpt[0], tmp_path / "e")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.ckpt"]


def test_a_killed_exports_temporary_directory_is_removed_by_the_next_export(ckpt, tmp_path):
    import os
    import socket

    prefix = f".e.tmp-{socket.gethostname()}-"
    dead, live = tmp_path / f"{prefix}999999999", tmp_path / f"{prefix}{os.getppid()}"
    for d in (dead, live):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"x" * 1000)
    export(ckpt[0], tmp_path / "e")
    assert not dead.exists() and live.exists()  # a live writer's directory is left alone


def test_out_dot_is_one_line(ckpt, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match=r"^out=\. would overwrite the input ckpt="):
        export(ckpt[0], ".")
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "notes.txt").write_text("the user's file")
    monkeypatch.chdir(tmp_path / "work")
    with pytest.raises(CheckpointError, match=r"^out=\. already exists"):
        export(ckpt[0], ".")
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.chdir(empty)
    assert export(ckpt[0], ".", overwrite=True) == empty and (empty / "model.safetensors").is_file()
