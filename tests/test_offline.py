"""Offline first (serengeti.data.hub): without the hub, a config that needs it fails in seconds naming the keys."""
from __future__ import annotations

import socket
import time

import pytest

from conftest import SHARED_DATA
from serengeti.data import hub
from serengeti.data.text import OpenWebText, WikiText
from serengeti.data.tokenizers import hub_tokenizer_name

GPT2 = SHARED_DATA / "gpt2"
WT_RAW = SHARED_DATA / "wikitext" / "wikitext-2-raw"


@pytest.fixture
def offline(monkeypatch):
    """No connection to the hub: the probe fails (whatever this machine's network), nothing is cached."""
    for var in hub._OFFLINE_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(hub, "_reachable", None)
    monkeypatch.setattr(hub, "_probe", lambda host, port, timeout_s: False)
    monkeypatch.setattr(hub, "dataset_cached", lambda name: False)
    monkeypatch.setattr(hub, "tokenizer_cached", lambda name: False)
    import serengeti.data.text as lm

    monkeypatch.setattr(lm, "dataset_cached", lambda name: False)
    monkeypatch.setattr(lm, "tokenizer_cached", lambda name: False)


def test_hub_dataset_and_tokenizer_offline_fail_fast_naming_both_keys(offline, tmp_path):
    start = time.monotonic()
    with pytest.raises(hub.HubUnreachable) as info:
        WikiText(tokenizer="gpt2", seq_len=16, batch_size=2, cache_dir=str(tmp_path))
    assert time.monotonic() - start < 5
    message = str(info.value)
    assert message.startswith("dataset.path and dataset.tokenizer: the Hugging Face hub cannot be reached")
    assert "dataset.path=<dir with wiki.{train,valid,test}.raw>" in message and "\n" not in message


def test_local_tokenizer_names_only_the_path(offline, tmp_path):
    with pytest.raises(hub.HubUnreachable, match=r"^dataset.path: .*dataset.path=<dir of \.txt documents"):
        OpenWebText(tokenizer=str(GPT2), seq_len=16, batch_size=2, cache_dir=str(tmp_path))


def test_local_data_and_tokenizer_never_ask_the_hub(monkeypatch, tmp_path):
    monkeypatch.setattr(hub, "_reachable", None)
    monkeypatch.setattr(hub, "_probe", lambda *a: pytest.fail("probed the hub for local files"))
    dm = WikiText(path=str(WT_RAW), tokenizer=str(GPT2), seq_len=16, batch_size=2, cache_dir=str(tmp_path),
                  train_split=None)
    assert dm.vocab_size == 50257


def test_cached_hub_items_switch_the_libraries_offline(monkeypatch):
    import datasets.config as datasets_config
    import huggingface_hub.constants as hub_constants

    for var in hub._OFFLINE_VARS:
        monkeypatch.setenv(var, "")  # restored after the test, as are the constants below
    monkeypatch.setattr(hub, "_reachable", False)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets_config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets_config, "HF_DATASETS_OFFLINE", False)
    hub.check_hub_needs([hub.HubNeed("dataset.tokenizer", "<dir>", cached=True)])
    assert hub_constants.HF_HUB_OFFLINE is True
    import os

    assert os.environ["HF_HUB_OFFLINE"] == "1"


def test_offline_environment_variable_skips_the_probe(monkeypatch):
    monkeypatch.setattr(hub, "_reachable", None)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub, "_probe", lambda *a: pytest.fail("probed although HF_HUB_OFFLINE=1"))
    assert hub.hub_reachable() is False
    with pytest.raises(hub.HubUnreachable, match=r"offline mode is set \(HF_HUB_OFFLINE\)"):
        hub.check_hub_needs([hub.HubNeed("dataset.tokenizer", "<dir>", cached=False)])


def test_probe_against_a_local_listener_and_a_closed_port():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        assert hub._probe("127.0.0.1", server.getsockname()[1], 2.0) is True
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]  # bound, not listening: the connection is refused
        start = time.monotonic()
        assert hub._probe("127.0.0.1", port, 2.0) is False
        assert time.monotonic() - start < 2.5


@pytest.mark.parametrize("spec, hub_name", [("gpt2", "gpt2"), ("EleutherAI/gpt-neox-20b", "EleutherAI/gpt-neox-20b"),
                                            ("char", None), ({"vocab": "v", "merges": "m"}, None),
                                            ("./missing", None), (str(GPT2), None)])
def test_hub_tokenizer_name(spec, hub_name):
    assert hub_tokenizer_name(spec) == hub_name


def test_evaluate_on_another_dataset_uses_the_exports_tokenizer(offline, monkeypatch, tmp_path, capsys):
    """An export trained with the hub's "gpt2" carries tokenizer.json: dataset=wikitext2 (whose config says
    tokenizer: gpt2) is scored with it, offline, without asking the hub."""
    import torch

    from conftest import compose_eval_cfg, experiment_model_config
    from serengeti.data.tokenizers import tokenizer_record
    from serengeti.io.checkpoint import save_pretrained
    from serengeti.data.tokenizers import load_tokenizer
    from serengeti.evaluate.run import run as evaluate
    from serengeti.models.backbone import build_model

    monkeypatch.setattr(hub, "_probe", lambda *a: pytest.fail("asked the hub although the export has its tokenizer"))
    tok = load_tokenizer(str(GPT2))
    record = {**tokenizer_record(tok, tok.vocab_size), "name": "gpt2"}  # as recorded by a run that used the hub
    model_cfg = experiment_model_config(["model=transformer", "model.d_model=16", "model.n_layer=1"],
                                        vocab_size=tok.vocab_size, l_max=32)
    torch.manual_seed(0)
    out = save_pretrained(build_model(model_cfg), {"model": model_cfg, "tokenizer": record}, tmp_path / "export",
                          tokenizer=tok)
    res = evaluate(compose_eval_cfg([f"ckpt={out}", "dataset=wikitext2", f"dataset.path={WT_RAW}", "split=test",
                                     "dataset.seq_len=32", "dataset.max_eval_tokens=256",
                                     f"paths.cache_dir={tmp_path / 'cache'}", "device=cpu"], tmp_path / "e"))
    assert res["test/loss"] == pytest.approx(float(torch.log(torch.tensor(50264.0))), rel=0.05)
    # the record says what was measured, and the cap is announced
    assert (res["seq_len"], res["tokens"], res["max_eval_tokens"]) == (32, 255, 256)
    assert res["data"] == [str((WT_RAW / "wiki.test.raw").resolve())]
    out = capsys.readouterr().out
    assert "dataset.max_eval_tokens=256 (set for this evaluation): only the first 256 tokens of the test split" in out
    assert "[serengeti] scored 255 tokens of the test split" in out and "tokenizer.json (the checkpoint's own" in out
