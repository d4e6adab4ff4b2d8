"""Files from elsewhere get no say beyond their own contents: no custom tokenizer code, even on a terminal.

A payload that ran would create a flag file; each test asserts it never appears and that the loader
stops in one line naming the setting or file.
"""
from __future__ import annotations

import builtins
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from conftest import ROOT, compose_cfg
from serengeti.errors import CheckpointError
from serengeti.io.checkpoint import save_pretrained
from serengeti.models.pretrained import load_model
from serengeti.data.tokenizers import load_tokenizer
from serengeti.training.lm_task import build_model


@pytest.fixture
def flag(tmp_path):
    path = tmp_path / "PWNED"
    yield path
    assert not path.exists(), "a hostile payload ran"


@pytest.fixture
def terminal(monkeypatch):
    """A fake terminal that answers "y" to any prompt; yields the prompts that were shown."""
    prompts = []

    def answer(prompt=""):
        prompts.append(prompt)
        return "y"

    monkeypatch.setattr(builtins, "input", answer)
    monkeypatch.setattr(sys.stdin, "isatty", lambda: True, raising=False)
    return prompts


def _custom_code_tokenizer(root: Path, flag: Path, *, with_tokenizer_json: bool = False) -> Path:
    """A tokenizer folder whose ``tokenizer_config.json`` asks for its own Python code (``auto_map``)."""
    tok = root / "custom_tok"
    tok.mkdir()
    code = f"import pathlib\npathlib.Path({str(flag)!r}).touch()\nclass EvilTokenizer: pass\n"
    (tok / "evil.py").write_text(code)
    (tok / "tokenizer_config.json").write_text(json.dumps(
        {"auto_map": {"AutoTokenizer": ["evil.EvilTokenizer", "evil.EvilTokenizer"]}}))
    (tok / "config.json").write_text(json.dumps({"model_type": "evil", "auto_map": {"AutoConfig": "evil.EvilConfig"}}))
    if with_tokenizer_json:
        (tok / "tokenizer.json").write_text("{}")
    return tok


def test_custom_tokenizer_code_is_never_run_or_offered(tmp_path, flag, terminal, monkeypatch):
    tok = _custom_code_tokenizer(tmp_path, flag)
    with pytest.raises(ValueError, match=r"names custom code \(auto_map\), which serengeti never runs") as info:
        load_tokenizer(tok)
    assert "\n" not in str(info.value)
    # the second line of defence: transformers itself, told trust_remote_code=False, refuses without asking
    monkeypatch.setattr("serengeti.data.tokenizers._json_object", lambda path: {})
    with pytest.raises(ValueError, match="could not be loaded without running its own code") as info:
        load_tokenizer(tok)
    assert "\n" not in str(info.value)
    assert terminal == [], "no prompt was shown"


def test_custom_tokenizer_through_evaluate_and_an_export(tmp_path, flag, terminal):
    tok = _custom_code_tokenizer(tmp_path, flag)
    cfg = OmegaConf.to_container(compose_cfg(["model.vocab_size=10", "model.l_max=16"]).model, resolve=True)
    record = {"kind": "bpe", "name": str(tok), "eos_token": "<|endoftext|>", "vocab_size": 10, "fingerprint": "x"}
    out = save_pretrained(build_model(cfg), {"model": cfg, "tokenizer": record}, tmp_path / "export")
    for kwargs in ({"tokenizer": str(tok)}, {}):  # evaluate.py tokenizer=<dir>; the export's own record
        with pytest.raises(CheckpointError) as info:
            load_model(out, **kwargs)
        assert "\n" not in str(info.value) and ("custom code" in str(info.value) or "tokenizer" in str(info.value))
    assert terminal == []


# -- sizes in a stored config are checked against the weights before anything is allocated -----------

def _export_with(tmp_path: Path, name: str, **model_edits) -> Path:
    cfg = OmegaConf.to_container(compose_cfg(["model.vocab_size=10", "model.l_max=16"]).model, resolve=True)
    out = save_pretrained(build_model(cfg), {"model": cfg}, tmp_path / name)
    config = json.loads((out / "config.json").read_text())
    for key, value in model_edits.items():
        target = config["model"]
        *parents, leaf = key.split(".")
        for p in parents:
            target = target[p]
        target[leaf] = value
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.mark.parametrize("edit,expected", [
    ({"vocab_size": 16_000_000}, r"first mismatching key 'word_embeddings.weight': shape \(10, 64\) in the checkpoint, "
                                 r"\(16000000, 64\) in the model"),
    ({"n_layer": 100_000}, r"model.n_layer=100000 in its config, but its weights hold 2 layers"),
    ({"d_model": 1_000_000}, r"first mismatching key 'word_embeddings.weight'"),
    ({"mixer.num_inner_mlps": 1_000_000}, r"its config describes more tensors than the \d+ its weights hold"),
    ({"l_max": 10**9}, r"'layers.0.mixer.filter_fn.pos_emb.z': shape \(1, 16, 3\) in the checkpoint"),
])
def test_stored_sizes_must_match_the_weights(tmp_path, edit, expected):
    out = _export_with(tmp_path, "e", **edit)
    with pytest.raises(CheckpointError, match=f"^{out}: .*{expected}") as info:
        load_model(out)
    assert "\n" not in str(info.value)


@pytest.mark.slow  # two fresh interpreters importing torch
def test_refusing_huge_stored_sizes_stays_small_in_memory(tmp_path):
    for edit in ({"vocab_size": 16_000_000}, {"n_layer": 100_000}):
        out = _export_with(tmp_path, next(iter(edit)), **edit)
        message, peak_kb = _refusal_in_a_fresh_process(out)
        assert message.startswith(f"{out}: ")
        assert peak_kb < 1_000_000, f"peak RSS {peak_kb / 1e6:.2f} GB refusing {edit}"


def _refusal_in_a_fresh_process(path: Path) -> tuple[str, int]:
    """``(load_model's one-line refusal, peak RSS in KB)`` of loading ``path`` in a new interpreter."""
    script = ("import resource, sys\nfrom serengeti.errors import CheckpointError\nfrom serengeti.models.pretrained import load_model\n"
              "try:\n    load_model(sys.argv[1])\nexcept CheckpointError as e:\n    print(e)\n"
              "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n")
    res = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"})
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 2, res.stdout + res.stderr
    return lines[0], int(lines[1])


# -- zip-bomb checkpoints are refused before anything is inflated -------------------------------------

_CHUNK = 1 << 24  # 16 MiB of zeros per repeated deflate block


def zip_bomb(path: Path, inflated_gib: float) -> Path:
    """A ``.ckpt`` (torch's zip layout, a valid pickle) whose weights member is deflated zeros that
    inflate to ``inflated_gib`` GiB: a few kilobytes of file per gigabyte.

    The deflate stream is one byte-aligned, history-free block (``Z_FULL_FLUSH``) of 16 MiB of
    zeros repeated, then an empty final block, so a 10 GiB bomb is written in seconds.
    """
    import io
    import zipfile
    import zlib

    buf = io.BytesIO()
    torch.save({"state_dict": {"model.w": torch.zeros(4)}, "hyper_parameters": {"cfg": {"model": {}}}}, buf)
    block = (lambda c: c.compress(bytes(_CHUNK)) + c.flush(zlib.Z_FULL_FLUSH))(zlib.compressobj(9, zlib.DEFLATED, -15))

    class Repeat:  # stands in for zipfile's compressor: every 16 MiB of zeros becomes the same block
        def compress(self, data):
            return block

        def flush(self):
            return b"\x03\x00"

    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as src, zipfile.ZipFile(path, "w") as dst:
        for info in src.infolist():
            if not info.filename.endswith("/data/0"):
                dst.writestr(info, src.read(info))
                continue
            big = zipfile.ZipInfo(info.filename)
            big.compress_type = zipfile.ZIP_DEFLATED
            real = zipfile._get_compressor
            zipfile._get_compressor = lambda *a, **k: Repeat()
            try:
                with dst.open(big, "w", force_zip64=True) as f:
                    zeros = bytes(_CHUNK)
                    for _ in range(int(inflated_gib * (1 << 30)) // _CHUNK):
                        f.write(zeros)
            finally:
                zipfile._get_compressor = real
    return path


def test_zip_bomb_checkpoints_are_refused_before_inflating(tmp_path, monkeypatch):
    from serengeti.training.checkpoint_policy import SafeCheckpointIO
    from serengeti.convert import ConversionError, load_reference_state

    bomb = zip_bomb(tmp_path / "bomb.ckpt", 0.25)
    assert bomb.stat().st_size < 300_000  # deflate tops out near 1:1000

    def no_load(*args, **kwargs):
        raise AssertionError("torch.load was reached")

    monkeypatch.setattr("serengeti.io.checkpoint.torch.load", no_load)
    expected = rf"^{bomb}: its zip members would inflate to 268\.4 MB from a 0\.\d MB file"
    with pytest.raises(CheckpointError, match=expected):
        load_model(bomb)  # evaluate.py ckpt= / task=export
    with pytest.raises(ConversionError, match=expected):
        load_reference_state(bomb)  # python -m serengeti.convert
    with pytest.raises(CheckpointError, match=expected):
        SafeCheckpointIO().load_checkpoint(bomb)  # train.py ckpt_path=


@pytest.mark.slow  # writes a 10 MB bomb (10 GiB inflated) and runs a fresh interpreter
def test_refusing_a_10mb_zip_bomb_stays_small_in_memory(tmp_path):
    bomb = zip_bomb(tmp_path / "bomb.ckpt", 10)
    assert 9e6 < bomb.stat().st_size < 12e6
    message, peak_kb = _refusal_in_a_fresh_process(bomb)
    assert "would inflate to 10737.4 MB" in message
    assert peak_kb < 1_000_000, f"peak RSS {peak_kb / 1e6:.2f} GB refusing the bomb"


# -- an export's recorded dataset names no place: data, caches and hub ids come from the command line -------

def _word_tokenizer():
    """A 10-id tokenizer (``tokenizers`` WordLevel) standing in for a BPE one."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from serengeti.data.tokenizers import BPETokenizer

    vocab = {w: i for i, w in enumerate(["[UNK]", "<|endoftext|>", "a", "b", "c", "d", "e", "f", "g", "h"])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return BPETokenizer(backend, "words")


def _hostile_export(tmp_path: Path, *, with_tokenizer: bool) -> tuple[Path, Path]:
    """An export whose recorded dataset reads a 'system file', caches to a foreign folder under
    ``../../escaped`` and names a hub tokenizer; returns (export, system file)."""
    system = tmp_path / "system_file"
    system.write_text("root:x:0:0\n" * 50)
    cfg = OmegaConf.to_container(compose_cfg(["model.vocab_size=10", "model.l_max=16"]).model, resolve=True)
    dataset = {"_target_": "serengeti.data.text.TextFiles", "train": str(system), "validation": str(system),
               "name": "../../escaped", "tokenizer": "someone/tok", "cache_dir": str(tmp_path / "foreign_cache"),
               "seq_len": 8, "batch_size": 2}
    tok = _word_tokenizer()
    record = {"kind": "bpe", "name": "someone/tok", "eos_token": "<|endoftext|>", "vocab_size": 10,
              "fingerprint": tok.fingerprint}
    out = save_pretrained(build_model(cfg), {"model": cfg, "dataset": dataset, "tokenizer": record},
                          tmp_path / "export", tokenizer=tok if with_tokenizer else None)
    return out, system


@pytest.fixture
def no_hub(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the hub was contacted")

    monkeypatch.setattr("transformers.AutoTokenizer.from_pretrained", refuse)


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_an_exports_recorded_places_are_not_used(tmp_path, no_hub):
    from conftest import compose_eval_cfg
    from serengeti.errors import EvalError
    from serengeti.evaluate.run import run as evaluate

    out, system = _hostile_export(tmp_path, with_tokenizer=False)
    before = _files(tmp_path)
    with pytest.raises(EvalError) as info:
        evaluate(compose_eval_cfg([f"ckpt={out}"], tmp_path / "ev"))
    assert str(info.value) == (f"{out} is an export, whose recorded places are not used (dataset.tokenizer, "
                               "dataset.train, dataset.validation): give them on the command line "
                               "(+dataset.tokenizer=...) or pass dataset=<name>")
    with pytest.raises(CheckpointError, match=r"has no tokenizer.json \(the tokenizer it records, 'someone/tok', is not "
                                              r"looked up from an export\): pass tokenizer="):
        evaluate(compose_eval_cfg(["task=generate", f"ckpt={out}", "prompt=a"], tmp_path / "g"))
    assert _files(tmp_path) - before <= {"ev", "g"}, "nothing was written outside the run dirs"


def test_an_export_scores_on_the_users_data_and_cache(tmp_path, no_hub):
    from conftest import compose_eval_cfg
    from serengeti.evaluate.run import run as evaluate

    out, _ = _hostile_export(tmp_path, with_tokenizer=True)
    mine = tmp_path / "mine.txt"
    mine.write_text("a b c d e f g h\n" * 40)
    cache = tmp_path / "my_cache"
    res = evaluate(compose_eval_cfg([f"ckpt={out}", f"+dataset.train={mine}", f"+dataset.validation={mine}",
                                     f"paths.cache_dir={cache}"], tmp_path / "ev"))
    assert res["val/loss"] > 0
    assert {p.name for p in cache.iterdir()} == {"text_files"}, "the datamodule's own cache folder, under the user's cache"
    assert not (tmp_path / "foreign_cache").exists() and not list(tmp_path.parent.glob("escaped*"))


def test_cache_names_stay_inside_the_cache(tmp_path):
    from serengeti.data.text import TextFiles
    from serengeti.data.token_cache import cache_paths

    text = tmp_path / "t.txt"
    text.write_text("hello\n")
    for name in ("../../x", "/etc", ".hidden", "a/b", ""):
        with pytest.raises(ValueError, match=r"^dataset.name=.*: expected a plain name for the token cache"):
            TextFiles(train=str(text), name=name, tokenizer="char", seq_len=4, batch_size=1, cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"^dataset split='../v'"):
        cache_paths(tmp_path, "ok", "../v", {})
    assert [p.name for p in tmp_path.iterdir()] == ["t.txt"]
