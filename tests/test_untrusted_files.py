"""Files from elsewhere get no say beyond their own contents: no custom tokenizer code, even on a terminal.

A payload that ran would create a flag file; each test asserts it never appears and that the loader
stops in one line naming the setting or file.
"""
from __future__ import annotations

import builtins
import json
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import compose_cfg
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
