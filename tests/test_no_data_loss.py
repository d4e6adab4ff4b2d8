"""Nothing a user owns is deleted or overwritten: ``overwrite`` replaces only an export of ours, a config
error removes only what the run made, and no command writes over one of its inputs.

Each command-line case plants a user file and a training run directory, runs the command, and checks
both are byte-identical afterwards.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from conftest import compose_cfg, compose_eval_cfg
from entry_runs import run_in_process, run_subprocess
from serengeti.io.atomic import input_clash, replace_dir
from serengeti.errors import CheckpointError
from serengeti.io.checkpoint import check_export_target, save_pretrained
from serengeti.models.pretrained import export, load_model
from serengeti.convert import main as convert_main
from serengeti.errors import EvalError
from serengeti.evaluate.run import check_settings
from serengeti.training.lm_task import build_model


def _model_cfg() -> dict:
    return OmegaConf.to_container(compose_cfg(["model.vocab_size=10", "model.l_max=16"]).model, resolve=True)


def _plant_run(root: Path) -> Path:
    """A training run directory: Hydra's files, a log, a real ``last.ckpt`` and a record."""
    run = root / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text("seed: 1\n")
    (run / "train.log").write_text("step 1\n")
    (run / "metrics.json").write_text('{"val/loss": 1.0}\n')
    (run / "checkpoints").mkdir()
    model = build_model(_model_cfg())
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "hyper_parameters": {"cfg": {"model": _model_cfg()}}, "global_step": 3},
               run / "checkpoints" / "last.ckpt")
    return run


def _plant_user(root: Path) -> tuple[Path, Path]:
    """A user's file, and a folder of the user's notes."""
    notes = root / "notes"
    notes.mkdir()
    (notes / "notes.log").write_text("my notes\n")
    user_file = root / "results.txt"
    user_file.write_text("precious\n")
    return user_file, notes


def _snapshot(*paths: Path) -> dict[str, bytes | None]:
    """Every file under ``paths`` (relative name -> bytes), directories included as ``None``."""
    snap: dict[str, bytes | None] = {}
    for p in paths:
        for q in [p, *sorted(p.rglob("*"))] if p.is_dir() else [p]:
            snap[str(q)] = None if q.is_dir() else q.read_bytes()
    return snap


def _cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """``python train.py|evaluate.py ARGS`` run in this process (:func:`entry_runs.run_in_process`)."""
    return run_in_process(args[0], args[1:], cwd=cwd)


def _one_line(res: subprocess.CompletedProcess) -> str:
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.returncode != 0 and len(lines) == 1, res.stderr[-3000:]
    return lines[0]


# -- overwrite replaces only an export of ours -------------------------------------------------------

def test_export_overwrite_refuses_everything_but_an_export(tmp_path):
    run = _plant_run(tmp_path)
    user_file, notes = _plant_user(tmp_path)
    ckpt = run / "checkpoints" / "last.ckpt"
    before = _snapshot(run, user_file, notes)
    cases = [
        (run, "would overwrite the input ckpt="),                         # the run holding the checkpoint
        (ckpt, "would overwrite the input ckpt="),                        # the checkpoint itself
        (notes, "is not an export written by serengeti (it holds 'notes.log')"),
        (user_file, "is not an export written by serengeti (a file)"),
    ]
    for out, expected in cases:
        with pytest.raises(CheckpointError, match=r"^out=.*") as info:
            export(ckpt, out, overwrite=True)
        assert expected in str(info.value) and "\n" not in str(info.value), str(info.value)
    link = tmp_path / "link"
    link.symlink_to(notes)
    with pytest.raises(CheckpointError, match="a symbolic link"):
        export(ckpt, link, overwrite=True)
    assert _snapshot(run, user_file, notes) == before
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir()), "no temporary directory left behind"


def test_export_overwrite_replaces_an_export_or_an_empty_directory(tmp_path):
    run = _plant_run(tmp_path)
    ckpt = run / "checkpoints" / "last.ckpt"
    (tmp_path / "empty").mkdir()
    export(ckpt, tmp_path / "empty", overwrite=True)
    out = export(ckpt, tmp_path / "e")
    with pytest.raises(CheckpointError, match="already exists"):
        export(ckpt, out)
    stale = json.loads((out / "config.json").read_text())
    stale["model"]["n_layer"] = 99  # an older export: replaced by the new one
    (out / "config.json").write_text(json.dumps(stale))
    export(ckpt, out, overwrite=True)
    assert json.loads((out / "config.json").read_text())["model"]["n_layer"] == _model_cfg()["n_layer"]
    load_model(out)
    with pytest.raises(CheckpointError, match="would overwrite the input ckpt="):
        export(out, out, overwrite=True)  # re-exporting an export onto itself
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "config.json").write_text('{"model_type": "gpt2"}')
    (foreign / "model.safetensors").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="its config.json is not serengeti's"):
        check_export_target(foreign, overwrite=True)


def test_replacing_an_export_never_leaves_the_path_empty(tmp_path, monkeypatch):
    """Swapped in one step; where that is unavailable, the old export is renamed back if the new one fails."""
    old, new = tmp_path / "old", tmp_path / "new"
    for d, text in ((old, "old"), (new, "new")):
        d.mkdir()
        (d / "config.json").write_text(text)
    seen = []
    real_rmtree = __import__("shutil").rmtree
    monkeypatch.setattr("serengeti.io.atomic.shutil.rmtree",
                        lambda p, **kw: (seen.append((old / "config.json").read_text()), real_rmtree(p, **kw)))
    replace_dir(new, old)
    assert (old / "config.json").read_text() == "new" and seen == ["new"] and not new.exists()

    monkeypatch.setattr("serengeti.io.atomic._exchange", lambda a, b: False)
    new.mkdir()
    (new / "config.json").write_text("newer")
    real_replace = os.replace

    def replace(src, dst):
        if Path(src) == new:
            raise OSError(28, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr("serengeti.io.atomic.os.replace", replace)
    with pytest.raises(OSError):
        replace_dir(new, old)
    assert (old / "config.json").read_text() == "new"  # the old export is back in place
    monkeypatch.setattr("serengeti.io.atomic.os.replace", real_replace)
    replace_dir(new, old)
    assert (old / "config.json").read_text() == "newer" and [p.name for p in tmp_path.iterdir()] == ["old"]


def test_evaluate_export_cli_onto_a_run_dir_keeps_it(tmp_path):
    run = _plant_run(tmp_path)
    user_file, notes = _plant_user(tmp_path)
    before = _snapshot(run, user_file, notes)
    line = _one_line(_cli(["evaluate.py", "task=export", f"ckpt={run / 'checkpoints' / 'last.ckpt'}", f"out={run}",
                           "overwrite=true", f"hydra.run.dir={tmp_path / 'ev'}"], tmp_path))
    assert line.startswith(f"error: out={run} would overwrite the input ckpt="), line
    assert _snapshot(run, user_file, notes) == before


def test_convert_overwrite_refuses_a_run_dir_and_a_file(tmp_path, capsys):
    run = _plant_run(tmp_path)
    user_file, notes = _plant_user(tmp_path)
    ref = tmp_path / "ref.pt"
    ref.write_bytes(b"never read")
    before = _snapshot(run, user_file, notes)
    res = run_subprocess("-m serengeti.convert", ["--from", "safari-h3", str(ref), str(run), "--overwrite"], tmp_path)
    assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr
    assert f"error: out_dir={run} is not an export written by serengeti (it holds '.hydra' and 3 more)" in res.stderr
    for out, expected in ((user_file, "(a file)"), (notes, "(it holds 'notes.log')"),
                          (tmp_path, f"would overwrite the input input={ref}")):
        assert convert_main(["--from", "safari-h3", str(ref), str(out), "--overwrite"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"error: out_dir={out} " in err and expected in err, err
    assert _snapshot(run, user_file, notes) == before


# -- a config error removes only what the run made ---------------------------------------------------

def test_train_config_error_in_an_existing_dir_keeps_the_users_files(tmp_path):
    run = _plant_run(tmp_path)
    user_file, notes = _plant_user(tmp_path)
    before = _snapshot(run, user_file, notes)
    for d in (notes, run):  # the user's folder with a .log in it; a finished run (Hydra rewrites .hydra/, appends to the log)
        line = _one_line(_cli(["train.py", f"hydra.run.dir={d}", "optimizer.lr=0"], tmp_path))
        assert line == "config error: optimizer.lr=0: expected a number > 0"
    assert _snapshot(run, user_file, notes) == before  # Hydra's new files removed, its rewrites undone


# -- never write over an input ------------------------------------------------------------------------

def test_evaluate_out_may_not_be_an_input(tmp_path):
    run = _plant_run(tmp_path)
    ckpt = run / "checkpoints" / "last.ckpt"
    data = tmp_path / "valid.txt"
    data.write_text("hello\n")
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text("{}")
    cases = [
        ([f"out={ckpt}"], f"out={ckpt} would overwrite the input ckpt={ckpt}"),
        ([f"out={run / 'checkpoints'}"], "would overwrite the input ckpt="),
        ([f"out={data}", "dataset=text_files", f"dataset.train={data}"], f"the input dataset.train={data}"),
        ([f"out={tok / 'tokenizer.json'}", f"tokenizer={tok}"], f"the input tokenizer={tok}"),
        (["task=lm_eval", f"out={tok}", f"include_path={tok}"], f"the input include_path={tok}"),
        (["task=export", f"out={run}", "overwrite=true"], "would overwrite the input ckpt="),
    ]
    for extra, expected in cases:
        cfg = compose_eval_cfg([f"ckpt={ckpt}", *extra], tmp_path / "ev")
        with pytest.raises((EvalError, CheckpointError)) as info:
            check_settings(cfg)
        assert expected in str(info.value), (extra, str(info.value))
    assert input_clash(tmp_path / "other.json", {"ckpt": ckpt, "n": 3, "none": None}) is None


def test_evaluate_cli_out_onto_the_checkpoint_keeps_it(tmp_path):
    run = _plant_run(tmp_path)
    user_file, notes = _plant_user(tmp_path)
    ckpt = run / "checkpoints" / "last.ckpt"
    before = _snapshot(run, user_file, notes)
    line = _one_line(_cli(["evaluate.py", f"ckpt={ckpt}", f"out={ckpt}", f"hydra.run.dir={run}"], tmp_path))
    assert line == f"error: out={ckpt} would overwrite the input ckpt={ckpt}: give another path for the JSON file"
    assert _snapshot(run, user_file, notes) == before


def test_save_pretrained_refuses_an_input(tmp_path):
    model = build_model(_model_cfg())
    out = save_pretrained(model, {"model": _model_cfg()}, tmp_path / "e")
    with pytest.raises(CheckpointError, match="would overwrite the input tokenizer="):
        save_pretrained(model, {"model": _model_cfg()}, out, overwrite=True, inputs={"tokenizer": out / "config.json"})


def test_run_dirs_removes_only_what_it_saw_appear(tmp_path):
    """Sweep job folders: one made by this sweep goes, one that existed keeps everything but Hydra's new files;
    a folder no callback saw is never touched."""
    from serengeti.training.run_dirs import RecordRunDirs, remove_fresh_run_dir

    sweep = tmp_path / "sweep"
    (sweep / "0").mkdir(parents=True)
    (sweep / "0" / "notes.log").write_text("mine\n")
    RecordRunDirs().on_multirun_start(OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}}))
    for job in ("0", "1"):  # what Hydra writes into each job folder
        (sweep / job / ".hydra").mkdir(parents=True)
        (sweep / job / ".hydra" / "config.yaml").write_text("x: 1\n")
        (sweep / job / "train.log").write_text("")
    remove_fresh_run_dir(sweep / "0")
    remove_fresh_run_dir(sweep / "1")
    assert sorted(p.name for p in sweep.iterdir()) == ["0"]
    assert sorted(p.name for p in (sweep / "0").iterdir()) == ["notes.log"]
    unseen = tmp_path / "unseen"
    (unseen / ".hydra").mkdir(parents=True)
    remove_fresh_run_dir(unseen)
    assert (unseen / ".hydra").is_dir()
