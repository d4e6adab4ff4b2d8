"""Bad input stops in one line naming the key or file: train config checks, text files, evaluate settings.

Most cases call the checks directly; a few run train.py / evaluate.py as a user would (each once in a new
interpreter, the others in this process: ``entry_runs``) and check the exit status, that stderr is one line, and that no run
dir is left behind. The cases are listed here (parametrised); docs/reliability.md gives one example per pattern.
"""
from __future__ import annotations

import gzip
import os
import subprocess
from pathlib import Path

import pytest

import serengeti.training.run  # noqa: F401  (registers the config resolvers the configs use)
from conftest import ROOT, compose_cfg, compose_eval_cfg, tiny_overrides
from entry_runs import run_in_process, run_subprocess
from serengeti.data.sources import DataFileError
from serengeti.data.text import TextFiles, TinyShakespeare
from serengeti.errors import CheckpointError, ConfigError, EvalError
from serengeti.evaluate.run import check_settings, run as evaluate
from serengeti.training.config_checks import check_config

# -- train config: types and ranges -----------------------------------------------------------

BAD_TRAIN = [
    ("optimizer.lr=0", r"optimizer.lr=0: expected a number > 0"),
    ("optimizer.lr=-1", r"optimizer.lr=-1: expected a number > 0"),
    ("optimizer.lr=abc", r"optimizer.lr='abc': expected a number > 0"),
    ("optimizer.lr=nan", r"optimizer.lr=nan: expected a number > 0"),
    ("optimizer.weight_decay=-1", r"optimizer.weight_decay=-1: expected a number >= 0"),
    ("optimizer.eps=0", r"optimizer.eps=0: expected a number > 0"),
    ("optimizer.betas=[2,0.9]", r"optimizer.betas=\[2, 0.9\]: expected two numbers in \[0, 1\)"),
    ("optimizer.betas=0.9", r"optimizer.betas=0.9: expected two numbers"),
    ("optimizer.name=sgd", r"optimizer.name='sgd': expected one of \['adamw'\]"),
    ("optimizer.weight_decay_policy=all", r"optimizer.weight_decay_policy='all': expected one of"),
    ("dataset.batch_size=0", r"dataset.batch_size=0: expected an integer >= 1"),
    ("dataset.batch_size=abc", r"dataset.batch_size='abc': expected an integer >= 1"),
    ("dataset.batch_size=2.5", r"dataset.batch_size=2.5: expected an integer >= 1"),
    ("dataset.num_examples=0", r"dataset.num_examples=0: expected an integer >= 1"),
    ("dataset.seq_len=0", r"dataset.seq_len=0: expected an integer >= 1"),
    ("dataset.num_workers=-1", r"dataset.num_workers=-1: expected an integer >= 0"),
    ("model.n_layer=0", r"model.n_layer=0: expected an integer >= 1"),
    ("model.n_layer=abc", r"model.n_layer='abc': expected an integer >= 1"),
    ("model.n_layer=true", r"model.n_layer=True: expected an integer >= 1"),
    ("model.d_model=-8", r"model.d_model=-8: expected an integer >= 1"),
    ("model.vocab_size=abc", r"model.vocab_size='abc': expected an integer >= 1 \(or null\)"),
    ("model.embed_dropout=1.5", r"model.embed_dropout=1.5: expected a probability in \[0, 1\)"),
    ("model.layer_norm_epsilon=0", r"model.layer_norm_epsilon=0: expected a number > 0"),
    ("trainer.max_steps=0", r"trainer.max_steps=0: expected an integer >= 1 or -1"),
    ("trainer.max_steps=-5", r"trainer.max_steps=-5: expected an integer >= 1 or -1"),
    ("trainer.accumulate_grad_batches=0", r"trainer.accumulate_grad_batches=0: expected an integer >= 1"),
    ("trainer.log_every_n_steps=0", r"trainer.log_every_n_steps=0: expected an integer >= 1"),
    ("trainer.gradient_clip_val=-1", r"trainer.gradient_clip_val=-1: expected a number >= 0"),
    ("trainer.val_check_interval=1.5", r"trainer.val_check_interval=1.5: expected an integer >= 1 or a fraction"),
    ("trainer.limit_val_batches=-1", r"trainer.limit_val_batches=-1: expected an integer >= 0 or a fraction"),
    ("trainer.devices=0", r"trainer.devices=0: expected a count >= 1, -1 \(all\), auto, or a list of device indices"),
    ("trainer.devices=[]", r"trainer.devices=\[\]: expected a count >= 1"),
    ("trainer.devices=abc", r"trainer.devices='abc': expected a count >= 1"),
    ("trainer.precision=bogus", r"trainer.precision='bogus': expected one of \[.*'32-true'"),
    ("scheduler.warmup_steps=-1", r"scheduler.warmup_steps=-1: expected an integer >= 0"),
    ("scheduler.warmup_steps=abc", r"scheduler.warmup_steps='abc': expected an integer >= 0"),
    ("scheduler.min_lr_ratio=2", r"scheduler.min_lr_ratio=2: expected a number in \[0, 1\]"),
    ("scheduler.name=bogus", r"scheduler.name='bogus': expected one of \['constant', 'cosine', 'linear'\]"),
    ("seed=abc", r"seed='abc': expected an integer"),
    ("seed=-1", r"seed=-1: expected an integer in \[0, 2\*\*32\)"),
    ("callbacks.model_checkpoint.every_n_train_steps=-1",
     r"callbacks.model_checkpoint.every_n_train_steps=-1: expected an integer >= 0"),
]


@pytest.mark.parametrize("override,message", BAD_TRAIN, ids=[o for o, _ in BAD_TRAIN])
def test_check_config_names_the_key(override, message):
    with pytest.raises(ConfigError, match=f"^{message}"):
        check_config(compose_cfg([override]))


def test_an_endless_schedule_is_refused():
    with pytest.raises(ConfigError, match="trainer.max_steps=-1 with trainer.max_epochs=-1: .*scheduler.total_steps"):
        check_config(compose_cfg(["trainer.max_steps=-1", "trainer.max_epochs=-1"]))
    check_config(compose_cfg(["trainer.max_steps=-1", "trainer.max_epochs=-1", "scheduler.total_steps=100"]))


def _experiments() -> list[str]:
    root = ROOT / "configs" / "experiment"
    return sorted(str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml"))


@pytest.mark.parametrize("experiment", [None, "wikitext/transformer", "owt/hybrid_h3", "pile/hyena",
                                        "synthetics/associative_recall/hyena_s5_131k_v30"])
def test_shipped_configs_pass(experiment):
    """The checks refuse nothing the repository ships: the default run and one experiment per family."""
    check_config(compose_cfg([f"experiment={experiment}"] if experiment else []))


@pytest.mark.slow  # composes every experiment (about 60)
def test_every_shipped_experiment_passes():
    for experiment in _experiments():
        check_config(compose_cfg([f"experiment={experiment}"]))


def test_prepare_checks_before_building(tmp_path, monkeypatch):
    """prepare() refuses a bad value before the datamodule is built."""
    from serengeti.training.run import prepare

    monkeypatch.setattr("serengeti.training.run.instantiate", lambda *a, **k: pytest.fail("built despite a bad config"))
    with pytest.raises(ConfigError, match="optimizer.lr=0"):
        prepare(compose_cfg(tiny_overrides(tmp_path) + ["optimizer.lr=0"], output_dir=tmp_path))


@pytest.mark.parametrize("override,message", [
    ("model.init_scheme=bogus", r"^model: model.init_scheme must be one of \['gpt2', 'lecun'\], got 'bogus'"),
    ("model.attn_layer_idx=[5]", r"^model: model.attn_layer_idx \[5\] out of range for model.n_layer=2"),
    ("dataset.vocab_size=1", r"^dataset.vocab_size must be >= 4"),
])
def test_constructor_checks_are_reported_with_their_group(override, message, tmp_path):
    """Options of one model or datamodule are checked by its constructor; prepare() names the group."""
    from serengeti.training.run import prepare

    with pytest.raises(ConfigError, match=message):
        prepare(compose_cfg(tiny_overrides(tmp_path) + [override], output_dir=tmp_path))


# -- text files -------------------------------------------------------------------------------

def _bad_files(tmp: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, what the message must say)."""
    files = {
        "binary": (tmp / "image.txt", bytes(range(256)) * 4, r"is not UTF-8 text \(byte 0x80"),
        "nul": (tmp / "nul.txt", b"hello\x00world\n" * 10, r"holds binary data \(a NUL character at character 5\)"),
        "latin1": (tmp / "latin1.txt", "caf\xe9 au lait\n".encode("latin-1") * 10, r"is not UTF-8 text \(byte 0xe9"),
        "bad_json": (tmp / "bad.jsonl", b'{"text": "a"}\nnot json\n', r"cannot be read: line 2 is not JSON"),
        "no_field": (tmp / "nofield.jsonl", b'{"body": "a"}\n', r"cannot be read: line 1 has no text field 'text' \(dataset.text_field\)"),
        "bad_gzip": (tmp / "bad.jsonl.gz", b"not gzip at all", r"cannot be read: Not a gzipped file"),
        "nul_json": (tmp / "nul.jsonl.gz", gzip.compress(b'{"text": "a\\u0000b"}\n'), r"holds binary data"),
    }
    for path, data, _ in files.values():
        path.write_bytes(data)
    return {name: (path, message) for name, (path, _, message) in files.items()}


@pytest.mark.parametrize("unit", ["file", "line"])
@pytest.mark.parametrize("name", ["binary", "nul", "latin1", "bad_json", "no_field", "bad_gzip", "nul_json"])
def test_unreadable_text_names_the_file(tmp_path, name, unit):
    path, message = _bad_files(tmp_path)[name]
    with pytest.raises(DataFileError, match=f"^dataset: the train file {path} {message}"):
        TextFiles(train=str(path), unit=unit, tokenizer="char", seq_len=8, batch_size=1, cache_dir=str(tmp_path / "c"))


def test_unreadable_text_names_the_file_with_a_bpe_tokenizer(tmp_path, shared_data):
    """With a BPE tokenizer the text is first read while building the token cache."""
    path, message = _bad_files(tmp_path)["nul"]
    dm = TextFiles(train=str(path), tokenizer=str(shared_data / "gpt2"), seq_len=8, batch_size=1,
                   cache_dir=str(tmp_path / "c"))
    with pytest.raises(DataFileError, match=f"{path} {message}"):
        dm.setup("fit")


def test_tinyshakespeare_local_file_must_be_text(tmp_path):
    path, message = _bad_files(tmp_path)["binary"]
    with pytest.raises(DataFileError, match=f"^dataset.path: the file {path} {message}"):
        TinyShakespeare(path=str(path), seq_len=8, batch_size=1, cache_dir=str(tmp_path / "c"))


def test_unwritable_cache_dir_names_the_key(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("abcdefgh " * 40)
    blocker = tmp_path / "a_file"
    blocker.write_text("")  # a directory cannot be made below a file, whoever runs the test
    dm = TextFiles(train=str(text), tokenizer="char", seq_len=8, batch_size=1, cache_dir=str(blocker / "cache"))
    with pytest.raises(ConfigError, match=f"^dataset.cache_dir: cannot write the token cache into {blocker}/cache"):
        dm.setup("fit")


# -- evaluate.py settings ---------------------------------------------------------------------

eval_cfg = compose_eval_cfg


BAD_EVAL = [
    ("num_samples=0", r"num_samples=0: expected an integer >= 1"),
    ("num_samples=-2", r"num_samples=-2: expected an integer >= 1"),
    ("max_new_tokens=-1", r"max_new_tokens=-1: expected an integer >= 1"),
    ("max_new_tokens=abc", r"max_new_tokens='abc': expected an integer >= 1"),
    ("max_new_tokens=1000000000", r"max_new_tokens=1000000000: expected an integer >= 1 and <= 1048576"),
    ("temperature=-1", r"temperature=-1: expected a number >= 0"),
    ("top_p=0", r"top_p=0: expected a number in \(0, 1\]"),
    ("top_p=1.5", r"top_p=1.5: expected a number in \(0, 1\]"),
    ("top_k=0", r"top_k=0: expected an integer >= 1"),
    ("batch_size=0", r"batch_size=0: expected an integer >= 1"),
    ("seed=abc", r"seed='abc': expected an integer"),
    ("split=train", r"split='train': expected one of \['test', 'val'\]"),
    ("precision=bogus", r"precision='bogus': expected one of"),
    ("device=nonsense", r"device='nonsense': expected auto, cpu, cuda or cuda:<index>"),
    ("num_fewshot=-1", r"num_fewshot=-1: expected an integer >= 0"),
    ("limit=0", r"limit=0: expected a number > 0"),
    ("position_buckets=[64,8]", r"position_buckets=\[64, 8\]: expected a list of increasing positive integers"),
    ("position_buckets=[8,8]", r"position_buckets=\[8, 8\]: expected a list of increasing positive integers"),
    ("position_buckets=[0]", r"position_buckets=\[0\]: expected a list of increasing positive integers"),
    ("position_buckets=[]", r"position_buckets=\[\]: expected a list of increasing positive integers"),
    ("position_buckets=[8.5]", r"position_buckets=\[8.5\]: expected a list of increasing positive integers"),
    ("position_buckets=abc", r"position_buckets='abc': expected a list of increasing positive integers"),
    ("position_buckets=8", r"position_buckets=8: expected a list of increasing positive integers"),
]


@pytest.mark.parametrize("override,message", BAD_EVAL, ids=[o for o, _ in BAD_EVAL])
def test_evaluate_settings_name_the_key(override, message, tmp_path):
    with pytest.raises(EvalError, match=f"^{message}"):
        check_settings(eval_cfg(["task=generate", override], tmp_path))


class LoadAttempted(Exception):
    pass


def test_unwritable_output_fails_before_the_model_is_loaded(tmp_path, monkeypatch):
    def load_model(*args, **kwargs):
        raise LoadAttempted

    monkeypatch.setattr("serengeti.evaluate.run.load_model", load_model)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(EvalError, match=f"^out: cannot write into {blocker}/sub"):
        evaluate(eval_cfg(["ckpt=x.ckpt", f"out={blocker / 'sub' / 'm.json'}"], tmp_path))
    with pytest.raises(EvalError, match=f"^out={tmp_path} is a directory"):
        evaluate(eval_cfg(["ckpt=x.ckpt", f"out={tmp_path}"], tmp_path))
    with pytest.raises(EvalError, match=f"^out: cannot write into {blocker}"):
        evaluate(eval_cfg(["task=export", "ckpt=x.ckpt", f"out={blocker / 'export'}"], tmp_path))
    with pytest.raises(EvalError, match=f"^paths.output_dir: cannot write into {blocker}/run"):
        evaluate(eval_cfg(["ckpt=x.ckpt"], blocker / "run"))
    # a writable out passes, and the write test leaves nothing behind (a missing folder is made and removed)
    with pytest.raises(LoadAttempted):
        evaluate(eval_cfg(["ckpt=x.ckpt", f"out={tmp_path / 'new' / 'deeper' / 'm.json'}"], tmp_path))
    assert not (tmp_path / "new").exists()


def test_bad_position_buckets_fail_before_the_model_is_loaded(tmp_path, monkeypatch):
    def load_model(*args, **kwargs):
        raise LoadAttempted

    monkeypatch.setattr("serengeti.evaluate.run.load_model", load_model)
    with pytest.raises(EvalError, match=r"^position_buckets=\[64, 8\]: expected a list of increasing positive integers"):
        evaluate(eval_cfg(["ckpt=x.ckpt", "position_buckets=[64,8]"], tmp_path))
    with pytest.raises(LoadAttempted):
        evaluate(eval_cfg(["ckpt=x.ckpt", "position_buckets=[8,32,64]"], tmp_path))


# -- the command lines ------------------------------------------------------------------------

def _one_line(res: subprocess.CompletedProcess) -> str:
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.returncode != 0 and len(lines) == 1, res.stderr[-3000:]
    return lines[0]


def test_train_cli_bad_value_is_one_line_and_leaves_no_run_dir(tmp_path):
    run_dir = tmp_path / "run"
    line = _one_line(run_subprocess("train.py", ["optimizer.lr=0", f"hydra.run.dir={run_dir}"], tmp_path))  # a real one
    assert line == "config error: optimizer.lr=0: expected a number > 0"
    assert not run_dir.exists()


def test_train_cli_binary_text_file_is_one_line_naming_it(tmp_path):
    path, _ = _bad_files(tmp_path)["binary"]
    run_dir = tmp_path / "run"
    line = _one_line(run_in_process("train.py", ["dataset=text_files", f"dataset.train={path}", "dataset.tokenizer=char",
                                                 f"paths.cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={run_dir}"],
                                    tmp_path))
    assert line.startswith(f"config error: dataset: the train file {path} is not UTF-8 text")
    assert not run_dir.exists()


def test_evaluate_cli_bad_setting_is_one_line_and_leaves_no_run_dir(tmp_path):
    run_dir = tmp_path / "run"
    line = _one_line(run_subprocess("evaluate.py", ["task=generate", "ckpt=x.ckpt", "num_samples=0",
                                                    f"hydra.run.dir={run_dir}"], tmp_path))  # a real one
    assert line == "error: num_samples=0: expected an integer >= 1"
    assert not run_dir.exists()


# -- checkpoint paths -------------------------------------------------------------------------

def _resume_from(path: Path) -> None:
    from serengeti.training.checkpoint_policy import SafeCheckpointIO, resolve_ckpt_path

    SafeCheckpointIO().load_checkpoint(resolve_ckpt_path(str(path), path.parent))


def _evaluate(path: Path) -> None:
    from serengeti.io.checkpoint import read_checkpoint

    read_checkpoint(path)


@pytest.mark.parametrize("what,load,message", [
    ("missing.ckpt", _resume_from, r"ckpt_path=.*missing.ckpt: no such checkpoint file \(give a .ckpt written by train.py"),
    ("corrupt.ckpt", _resume_from, r"corrupt.ckpt: cannot read the checkpoint \("),
    ("empty_dir", _evaluate, r"empty_dir: no model.safetensors in the directory"),
    ("corrupt.ckpt", _evaluate, r"corrupt.ckpt: cannot read the checkpoint \("),
])
def test_missing_or_unreadable_checkpoints_name_the_file(tmp_path, what, load, message):
    """``train.py ckpt_path=`` (resume) and ``evaluate.py ckpt=`` name the file in one line."""
    (tmp_path / "corrupt.ckpt").write_bytes(b"PK\x03\x04 not a zip" * 10)
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(CheckpointError, match=message):
        load(tmp_path / what)


def test_threads_beyond_the_machines_cpus_are_refused():
    from serengeti.runtime import set_threads

    with pytest.raises(ValueError, match=rf"^threads=100000: expected an integer >= 1 and <= {os.cpu_count()} "):
        set_threads(100000)


def test_a_zst_file_without_zstandard_keeps_the_install_hint(tmp_path):
    try:
        import zstandard  # noqa: F401
        pytest.skip("zstandard is installed")
    except ImportError:
        pass
    from serengeti.data.text import TextFiles

    (tmp_path / "a.jsonl.zst").write_bytes(b"\x28\xb5\x2f\xfd")
    with pytest.raises(ConfigError, match=r"a.jsonl.zst cannot be read: reading .* needs the 'zstandard' package "
                                          r"\(pip install zstandard\)"):
        TextFiles(train=str(tmp_path / "a.jsonl.zst"), tokenizer="char", seq_len=8, batch_size=1,
                  cache_dir=str(tmp_path / "cache")).setup("fit")
