"""Files from elsewhere never run code: every loader refuses hostile checkpoints, exports and configs.

Each payload, if it ran, would create a flag file; every test asserts the flag never appears and
the loader fails with its one-line error naming the key or file.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from conftest import compose_cfg
from entry_runs import run_in_process
from serengeti.errors import CheckpointError, EvalError, UnsafeConfigError
from serengeti.evaluate.perplexity import build_datamodule
from serengeti.io.checkpoint import read_checkpoint, save_pretrained
from serengeti.models.backbone import build_model
from serengeti.models.pretrained import load_model


class _Payload:
    """A pickle whose unpickling creates ``flag`` (what a weights_only=False load would run)."""

    def __init__(self, flag: Path) -> None:
        self.flag = flag

    def __reduce__(self):
        return (Path.touch, (self.flag,))


def _model_cfg() -> dict:
    cfg = compose_cfg(["model.vocab_size=10", "model.l_max=16"])
    return OmegaConf.to_container(cfg.model, resolve=True)


def _hostile_model_cfgs(flag: Path) -> list[tuple[str, dict, str]]:
    """(description, model config, key the error must name)."""
    base = _model_cfg()
    touch = {"_target_": "pathlib.Path.touch", "self": str(flag)}
    out = []

    def variant(desc, key, edit):
        cfg = copy.deepcopy(base)
        edit(cfg)
        out.append((desc, cfg, key))

    variant("mixer target builtins.exec", "model.mixer._target_",
            lambda c: c["mixer"].update({"_target_": "builtins.exec", "_partial_": False}))
    variant("mixer target os.system", "model.mixer._target_",
            lambda c: c["mixer"].update({"_target_": "os.system", "command": f"touch {flag}"}))
    variant("mixer target torch.load weights_only false", "model.mixer._target_",
            lambda c: c["mixer"].update({"_target_": "torch.load", "f": str(flag), "weights_only": False}))
    variant("mixer target builtins.open", "model.mixer._target_",
            lambda c: c.update(mixer={"_target_": "builtins.open", "_partial_": True, "file": str(flag), "mode": "w"}))
    variant("nested _target_ in a mixer option", "model.mixer.dropout",
            lambda c: c["mixer"].update({"dropout": touch}))
    variant("nested _target_ in a list option", "model.attn_layer_idx",
            lambda c: c.update(attn_layer_idx=[touch]))
    variant("_target_ in attn_cfg", "model.attn_cfg",
            lambda c: c.update(attn_cfg=touch))
    variant("hydra _args_ on the mixer", "model.mixer._args_",
            lambda c: c["mixer"].update({"_args_": [str(flag)]}))
    variant("_recursive_ flag on the mixer", "model.mixer._recursive_",
            lambda c: c["mixer"].update({"_recursive_": True}))
    variant("unknown model key carrying a target", "model.callback",
            lambda c: c.update(callback=touch))
    return out


@pytest.fixture
def flag(tmp_path):
    path = tmp_path / "PWNED"
    yield path
    assert not path.exists(), "a hostile payload ran"


def test_build_model_refuses_every_hostile_config(flag):
    cases = _hostile_model_cfgs(flag)
    assert len(cases) == 10
    for desc, cfg, key in cases:
        with pytest.raises(UnsafeConfigError) as info:
            build_model(cfg)
        msg = str(info.value)
        assert key in msg and "\n" not in msg, (desc, msg)
    assert not flag.exists()


def test_misspelt_mixer_option_names_the_key():
    cfg = _model_cfg()
    cfg["mixer"]["filterorder"] = 64
    with pytest.raises(UnsafeConfigError, match=r"model\.mixer\.filterorder: Hyena has no option 'filterorder'"):
        build_model(cfg)


def _write_ckpt(path: Path, cfg: dict, model: torch.nn.Module) -> None:
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "hyper_parameters": {"cfg": cfg}, "global_step": 0}, path)


def test_ckpt_with_hostile_config_is_refused(tmp_path, flag):
    model = build_model(_model_cfg())
    for i, (desc, cfg, key) in enumerate(_hostile_model_cfgs(flag)):
        path = tmp_path / f"h{i}.ckpt"
        _write_ckpt(path, {"model": cfg}, model)  # weights-only clean: only the config is hostile
        with pytest.raises(CheckpointError) as info:
            load_model(path)
        assert key in str(info.value) and str(path) in str(info.value), desc


def test_export_config_json_with_hostile_config_is_refused(tmp_path, flag):
    model = build_model(_model_cfg())
    out = save_pretrained(model, {"model": _model_cfg()}, tmp_path / "export")
    for desc, cfg, key in _hostile_model_cfgs(flag):
        config = json.loads((out / "config.json").read_text())
        config["model"] = cfg
        (out / "config.json").write_text(json.dumps(config))
        with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
            load_model(out)


def test_pickled_code_in_a_ckpt_is_refused(tmp_path, flag, monkeypatch):
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # an explicit weights_only=True still wins
    path = tmp_path / "pickle.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"cfg": _Payload(flag)}}, path)
    with pytest.raises(CheckpointError, match="cannot read the checkpoint"):
        read_checkpoint(path)


def test_stored_dataset_config_cannot_name_a_callable(flag):
    for cfg, key in [({"_target_": "os.system", "command": f"touch {flag}"}, "dataset._target_"),
                     ({"_target_": "serengeti.data.SyntheticDataModule", "task": "associative_recall", "vocab_size": 10,
                       "seq_len": 16, "batch_size": 4, "seed": {"_target_": "pathlib.Path.touch", "self": str(flag)}},
                      "dataset.seed"),
                     ({"_target_": "serengeti.data.SyntheticDataModule", "_args_": [1]}, "dataset._args_")]:
        with pytest.raises(EvalError, match=key.replace(".", r"\.")):
            build_datamodule(cfg)


def test_resume_and_evaluate_and_convert_refuse_pickled_code(tmp_path, flag):
    """The command-line loaders: train.py ckpt_path= (resume), evaluate.py ckpt=, serengeti.convert (each run
    as its command line, in this process: :func:`entry_runs.run_in_process`)."""
    path = tmp_path / "pickle.ckpt"
    torch.save({"state_dict": {}, "global_step": 1, "blob": _Payload(flag)}, path)
    env = {"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}
    train = run_in_process("train.py", [f"ckpt_path={path}", f"hydra.run.dir={tmp_path / 'run'}", "logger=none",
                                        "trainer.enable_progress_bar=false", "dataset.num_examples=64",
                                        "dataset.num_test_examples=16"], env=env)
    evaluate = run_in_process("evaluate.py", [f"ckpt={path}", f"hydra.run.dir={tmp_path / 'eval'}"], env=env)
    convert = run_in_process("-m serengeti.convert", ["--from", "safari-h3", str(path), str(tmp_path / "conv")],
                             env=env)
    for name, r in [("train", train), ("evaluate", evaluate), ("convert", convert)]:
        lines = [l for l in r.stderr.strip().splitlines() if l.strip()]
        assert r.returncode != 0 and "Traceback" not in r.stderr, (name, r.stderr[-2000:])
        assert str(path) in lines[-1], (name, lines[-1])
    assert "cannot read the checkpoint" in train.stderr
    assert not (tmp_path / "conv").exists()
