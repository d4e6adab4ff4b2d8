"""The lm-eval adapter's scoring and generation against direct forward passes (offline, no lm_eval needed)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import compose_cfg
from serengeti.data.tokenizers import CharTokenizer, load_tokenizer
from serengeti.evaluate import lm_eval_adapter
from serengeti.evaluate.lm_eval_adapter import LMScorer, run_lm_eval
from serengeti.training.lm_task import build_model

TEXT = "the quick brown fox jumps over the lazy dog. pack my box with five dozen liquor jugs!"
SMALL = {"hyena": {"filter_order": 8}, "h3": {"d_state": 8}, "attention": {"num_heads": 2}}  # configs/model/mixer/ + these


def _mixer_cfg(name: str) -> dict:
    from omegaconf import OmegaConf

    return {**OmegaConf.to_container(compose_cfg([f"model/mixer={name}"]).model.mixer, resolve=True), **SMALL[name]}


def tiny_lm(mixer: str, vocab_size: int, l_max: int | None = 16, seed: int = 0):
    torch.manual_seed(seed)
    cfg = {"d_model": 16, "n_layer": 2, "vocab_size": vocab_size, "l_max": l_max, "embed_dropout": 0.0,
           "resid_dropout": 0.0, "pad_vocab_size_multiple": 8, "mixer": _mixer_cfg(mixer)}
    model = build_model(cfg).eval()
    with torch.no_grad():  # bigger logits than the 0.02 init, so argmax/greedy checks are not ties
        model.word_embeddings.weight.mul_(50)
    return model


@pytest.fixture(scope="module")
def char_tok():
    return CharTokenizer("".join(sorted(set(TEXT))), eos=True)


def direct_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log p(ids[j+1] | ids[:j+1]) for every j, from one full forward: (len(ids) - 1,) float64."""
    logits = model(torch.tensor([ids[:-1]]))[0, :, : model.vocab_size].double()
    lp = F.log_softmax(logits, dim=-1)
    return lp.gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]


def enc(tok, text):
    return tok.encode_batch([text])[0] if text else []


@pytest.mark.parametrize("mixer", ["hyena", "h3"])
def test_loglikelihood_equals_direct_sum(mixer, char_tok):
    model = tiny_lm(mixer, char_tok.vocab_size)
    scorer = LMScorer(model, char_tok, batch_size=3)
    reqs = [("the quick", " brown fox"), ("", "lazy"), ("over the ", "dog"), (TEXT[:40], TEXT[40:45])]
    got = scorer.loglikelihood(reqs)
    for (ctx, cont), (lp, _) in zip(reqs, got):
        if ctx.endswith(" "):  # the trailing space belongs to the continuation
            ctx, cont = ctx[:-1], " " + cont
        c, k = enc(char_tok, ctx) or [char_tok.eos_id], enc(char_tok, cont)
        ids = (c + k)[-(scorer.max_length + 1):]  # long contexts are cut on the left
        want = direct_logprobs(model, ids)[-len(k):].sum().item()
        assert lp == pytest.approx(want, abs=1e-4)
    assert all(isinstance(g, bool) for _, g in got)


def test_is_greedy_flag(char_tok):
    model = tiny_lm("h3", char_tok.vocab_size)
    scorer = LMScorer(model, char_tok)
    ctx = enc(char_tok, "the lazy")
    ids = list(ctx)
    for _ in range(3):  # greedy continuation by repeated full forwards
        logits = model(torch.tensor([ids]))[0, -1, : model.vocab_size]
        ids.append(int(logits.argmax()))
    greedy = char_tok.decode(ids[len(ctx):])
    wrong_tok = next(t for t in range(char_tok.vocab_size - 1) if t != ids[-1])
    not_greedy = char_tok.decode(ids[len(ctx):-1] + [wrong_tok])
    (lp_g, is_g), (lp_n, is_n) = scorer.loglikelihood([("the lazy", greedy), ("the lazy", not_greedy)])
    assert is_g is True and is_n is False
    assert lp_g > lp_n


def test_batching_and_padding_do_not_change_results(char_tok):
    model = tiny_lm("hyena", char_tok.vocab_size)
    reqs = [(TEXT[:n], TEXT[n:n + m]) for n, m in [(3, 2), (11, 5), (1, 1), (7, 9), (14, 2)]]
    one = LMScorer(model, char_tok, batch_size=1).loglikelihood(reqs)
    many = LMScorer(model, char_tok, batch_size=5).loglikelihood(reqs)
    for (a, ga), (b, gb) in zip(one, many):
        assert a == pytest.approx(b, abs=1e-5) and ga == gb
    r1 = LMScorer(model, char_tok, batch_size=1).loglikelihood_rolling([TEXT, TEXT[:5]])
    r4 = LMScorer(model, char_tok, batch_size=4).loglikelihood_rolling([TEXT, TEXT[:5]])
    assert r1 == pytest.approx(r4, abs=1e-4)


@pytest.mark.parametrize("mixer,max_length", [("hyena", None), ("h3", 12)])
def test_rolling_windows_equal_direct_sum(mixer, max_length, char_tok):
    model = tiny_lm(mixer, char_tok.vocab_size, l_max=16 if mixer == "hyena" else None)
    scorer = LMScorer(model, char_tok, batch_size=4, max_length=max_length)
    M = scorer.max_length
    tokens = enc(char_tok, TEXT)
    assert len(tokens) > 3 * M
    # independent oracle: token j is predicted in the window of targets [a, b) = block j // M, fed the
    # M tokens that end just before b (prefix token first), one direct forward per window
    full = [char_tok.eos_id] + tokens
    want = 0.0
    for a in range(0, len(tokens), M):
        b = min(a + M, len(tokens))
        start = max(0, b - M)
        lp = direct_logprobs(model, full[start:b + 1])  # predictions of full[start+1 : b+1]
        want += lp[a - start:].sum().item()
    (got,) = scorer.loglikelihood_rolling([(TEXT,)])
    assert got == pytest.approx(want, abs=1e-3)
    # a text that fits in one window is the loglikelihood of the whole text after the prefix token
    short = TEXT[: M - 2]
    (roll,) = scorer.loglikelihood_rolling([short])
    ((ll, _),) = scorer.loglikelihood([("", short)])
    assert roll == pytest.approx(ll, abs=1e-5)
    assert roll == pytest.approx(direct_logprobs(model, [char_tok.eos_id] + enc(char_tok, short)).sum().item(), abs=1e-4)


@pytest.mark.parametrize("mixer", ["hyena", "attention"])
def test_generate_until_stops_at_until(mixer, char_tok):
    model = tiny_lm(mixer, char_tok.vocab_size, l_max=32)
    scorer = LMScorer(model, char_tok, max_length=32)
    ids = enc(char_tok, "the lazy")
    greedy = []
    for _ in range(10):  # reference: argmax of a full forward at every step
        logits = model(torch.tensor([ids + greedy]))[0, -1, : model.vocab_size]
        tok = int(logits.argmax())
        if tok == char_tok.eos_id:
            break
        greedy.append(tok)
    text = char_tok.decode(greedy)
    (full,) = scorer.generate_until([("the lazy", {"until": [], "max_gen_toks": len(greedy)})])
    assert full == text
    stop = text[3:5]
    cut = text.split(stop, 1)[0]
    (got,) = scorer.generate_until([("the lazy", {"until": [stop], "max_gen_toks": 10})])
    assert got == cut
    (got2,) = scorer.generate_until([("the lazy", {"until": stop, "max_gen_toks": 2})])
    assert got2 == text[:2].split(stop, 1)[0]


def test_gpt2_tokenizer_boundaries(shared_data):
    tok = load_tokenizer(shared_data / "gpt2" / "tokenizer.json")
    model = tiny_lm("h3", tok.vocab_size, l_max=None)
    scorer = LMScorer(model, tok)
    ((lp, _),) = scorer.loglikelihood([("Hello ", "world")])  # trailing space moves to " world"
    ctx, cont = tok.encode_batch(["Hello"])[0], tok.encode_batch([" world"])[0]
    assert cont == [995]
    assert lp == pytest.approx(direct_logprobs(model, ctx + cont)[-1].item(), abs=1e-5)


def test_errors(char_tok, monkeypatch):
    model = tiny_lm("h3", char_tok.vocab_size, l_max=None)
    with pytest.raises(ValueError, match="tokenizer"):
        LMScorer(model, None)
    with pytest.raises(ValueError, match="max_length"):
        LMScorer(model, char_tok, max_length=4).loglikelihood([("a", "the quick")])
    monkeypatch.setattr(lm_eval_adapter, "SerengetiLM", None)
    with pytest.raises(ImportError, match=r'pip install -e "\.\[eval\]"'):
        run_lm_eval(model, char_tok, ["lambada_openai"])


def test_registered_lm_eval_model(char_tok):
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.api.registry import get_model

    assert get_model("serengeti") is lm_eval_adapter.SerengetiLM
    model = tiny_lm("hyena", char_tok.vocab_size)
    lm = lm_eval_adapter.SerengetiLM(model=model, tokenizer=char_tok, batch_size="auto")
    reqs = [Instance("loglikelihood", {}, ("the quick", " brown"), 0),
            Instance("loglikelihood", {}, ("over", " the"), 1)]
    assert lm.loglikelihood(reqs) == LMScorer(model, char_tok).loglikelihood([r.args for r in reqs])
    roll = [Instance("loglikelihood_rolling", {}, (TEXT,), 0)]
    assert lm.loglikelihood_rolling(roll)[0] == pytest.approx(LMScorer(model, char_tok).loglikelihood_rolling([TEXT])[0])


@pytest.mark.slow
def test_simple_evaluate_on_local_tasks(tmp_path, char_tok):
    """lm_eval end to end (offline) on local JSON tasks of every request type; the multiple-choice
    accuracy equals the argmax of the adapter's own log-likelihoods. Slow: lm_eval indexes its tasks."""
    pytest.importorskip("lm_eval")
    import json

    rows = [{"q": "the quick brown", "choices": ["fox", "dog"], "label": 0, "answer": "fox"},
            {"q": "the lazy", "choices": ["fox", "dog", "box"], "label": 1, "answer": "dog"},
            {"q": "pack my", "choices": ["box", "jugs"], "label": 0, "answer": "box"},
            {"q": "over the", "choices": ["lazy", "quick", "jugs"], "label": 0, "answer": "lazy"}]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = {"dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}}, "test_split": "test"}
    tasks = [
        dict(base, task="tiny_mc", output_type="multiple_choice", doc_to_text="{{q}}", doc_to_choice="{{choices}}",
             doc_to_target="{{label}}", metric_list=[{"metric": "acc"}]),
        dict(base, task="tiny_roll", output_type="loglikelihood_rolling", doc_to_text="", doc_to_target="{{q}}",
             metric_list=[{"metric": "word_perplexity"}]),
        dict(base, task="tiny_gen", output_type="generate_until", doc_to_text="{{q}}", doc_to_target="{{answer}}",
             generation_kwargs={"until": ["."], "max_gen_toks": 4}, metric_list=[{"metric": "exact_match"}]),
    ]
    model = tiny_lm("hyena", char_tok.vocab_size, l_max=32)
    out = run_lm_eval(model, char_tok, tasks, batch_size=4, bootstrap_iters=0)
    res = out["results"]
    scorer = LMScorer(model, char_tok)
    for sample in out["samples"]["tiny_mc"]:  # per-choice log-likelihoods as lm_eval recorded them
        r = sample["doc"]
        want = scorer.loglikelihood([(r["q"], " " + c) for c in r["choices"]])
        got = [resp[0] for resp in sample["resps"]]
        assert [float(g[0]) for g in got] == pytest.approx([w[0] for w in want], abs=1e-5)
    # lm_eval joins context and choice with its default target_delimiter " "
    acc = sum(max(range(len(r["choices"])), key=lambda c: scorer.loglikelihood([(r["q"], " " + r["choices"][c])])[0][0])
              == r["label"] for r in rows) / len(rows)
    assert res["tiny_mc"]["acc,none"] == pytest.approx(acc)
    assert set(res) == {"tiny_mc", "tiny_roll", "tiny_gen"}


def test_max_length_is_the_models_own(char_tok):
    """One rule with generation and perplexity: LMHeadModel.max_seq_len (Hyena: l_max), else the default
    for models that take any length (H3, even with an l_max set); a longer max_length is refused."""
    assert LMScorer(tiny_lm("hyena", char_tok.vocab_size, l_max=16), char_tok).max_length == 16
    assert LMScorer(tiny_lm("h3", char_tok.vocab_size, l_max=16), char_tok).max_length == lm_eval_adapter.DEFAULT_MAX_LENGTH
    assert LMScorer(tiny_lm("h3", char_tok.vocab_size, l_max=16), char_tok, max_length=40).max_length == 40
    with pytest.raises(ValueError, match="max_length=20 exceeds the model's maximum sequence length 16"):
        LMScorer(tiny_lm("hyena", char_tok.vocab_size, l_max=16), char_tok, max_length=20)


def test_prefix_token_id_defaults_and_errors():
    model = tiny_lm("h3", 8, l_max=None)
    newline = CharTokenizer("ab\ncd", eos=False)  # char vocabulary without end-of-text: "\n" starts texts
    assert LMScorer(model, newline).prefix_token_id == newline.encode_batch(["\n"])[0][0]
    assert LMScorer(model, newline, prefix_token_id=3).prefix_token_id == 3
    with pytest.raises(ValueError, match=r"prefix_token_id: the tokenizer has no end-of-text id and no newline"):
        LMScorer(model, CharTokenizer("abcd", eos=False))
    with pytest.raises(ValueError, match=r"prefix_token_id=8 is not a token id in \[0, 8\)"):
        LMScorer(model, newline, prefix_token_id=8)


# --- local tasks through lm_eval's command line and evaluate.py, on exported BPE / char checkpoints -------------

MC_ROWS = [{"question": "The king is", "choices": ["dead", "here", "gone"], "label": 0},
           {"question": "Good morrow, my", "choices": ["lord", "lady"], "label": 1},
           {"question": "What say you", "choices": ["now", "then", "sir"], "label": 2},
           {"question": "Farewell", "choices": ["friend", "good night"], "label": 0}]
ROLLING_ROWS = [{"text": "To be or not to be."}, {"text": "Now is the winter of"}]


def write_local_tasks(root: Path) -> Path:
    """``tiny_mc`` (multiple choice, acc) and ``tiny_roll`` (rolling log-likelihood) as task YAMLs over JSON lines."""
    import json

    import yaml

    root.mkdir(parents=True, exist_ok=True)
    for name, rows in (("mc", MC_ROWS), ("roll", ROLLING_ROWS)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = {"dataset_path": "json", "test_split": "test"}
    mc = dict(base, task="tiny_mc", dataset_kwargs={"data_files": {"test": str(root / "mc.jsonl")}},
              output_type="multiple_choice", doc_to_text="{{question}}", doc_to_choice="{{choices}}",
              doc_to_target="{{label}}", metric_list=[{"metric": "acc"}])
    roll = dict(base, task="tiny_roll", dataset_kwargs={"data_files": {"test": str(root / "roll.jsonl")}},
                output_type="loglikelihood_rolling", doc_to_text="", doc_to_target="{{text}}",
                metric_list=[{"metric": "word_perplexity"}])
    (root / "tiny_mc.yaml").write_text(yaml.safe_dump(mc))
    (root / "tiny_roll.yaml").write_text(yaml.safe_dump(roll))
    return root


def expected_metrics(model, tok, prefix_id: int) -> dict[str, float]:
    """``acc`` of tiny_mc and ``word_perplexity`` of tiny_roll from full forward passes of the model
    (lm_eval joins question and choice with a space; rolling texts follow the prefix token)."""
    import math
    import re

    correct = 0
    for row in MC_ROWS:
        ctx = enc(tok, row["question"])
        lls = []
        for choice in row["choices"]:
            cont = enc(tok, " " + choice)
            lls.append(direct_logprobs(model, ctx + cont)[-len(cont):].sum().item())
        correct += max(range(len(lls)), key=lls.__getitem__) == row["label"]
    ll = sum(direct_logprobs(model, [prefix_id] + enc(tok, r["text"])).sum().item() for r in ROLLING_ROWS)
    words = sum(len(re.split(r"\s+", r["text"])) for r in ROLLING_ROWS)
    return {"acc": correct / len(MC_ROWS), "word_perplexity": math.exp(-ll / words)}


@pytest.fixture(scope="module", params=["bpe", "char"])
def exported_with_tasks(request, tmp_path_factory):
    pytest.importorskip("lm_eval", reason='lm_eval is not installed: pip install -e ".[eval]"')
    from test_pretrained import shared_run

    from serengeti import LMHeadModel, load_tokenizer

    tmp = tmp_path_factory.mktemp(f"lm_eval_{request.param}")
    export_dir = shared_run(tmp_path_factory, request.param)["export_dir"]
    model, tok = LMHeadModel.from_pretrained(export_dir), load_tokenizer(export_dir)
    prefix = tok.eos_id if request.param == "bpe" else tok.encode_batch(["\n"])[0][0]
    assert (tok.eos_id is None) == (request.param == "char"), "Tiny Shakespeare's char vocabulary has no end-of-text"
    return export_dir, write_local_tasks(tmp / "tasks"), expected_metrics(model, tok, prefix)


def _check(results: dict, want: dict) -> None:
    assert results["tiny_mc"]["acc,none"] == pytest.approx(want["acc"])
    assert results["tiny_roll"]["word_perplexity,none"] == pytest.approx(want["word_perplexity"], rel=1e-4)


def test_evaluate_py_runs_local_tasks(exported_with_tasks, tmp_path):
    import json

    from conftest import compose_eval_cfg as eval_cfg

    from serengeti.evaluate.run import run as evaluate

    export_dir, tasks_dir, want = exported_with_tasks
    out = tmp_path / "lm_eval.json"
    evaluate(eval_cfg(["task=lm_eval", f"ckpt={export_dir}", f"include_path={tasks_dir}", "tasks=[tiny_mc,tiny_roll]",
                       "device=cpu", f"out={out}"], tmp_path / "run"))
    _check(json.loads(out.read_text()), want)


@pytest.mark.slow
def test_lm_eval_command_line_runs_local_tasks(exported_with_tasks, tmp_path):
    """The installed ``serengeti-lm-eval`` script (lm_eval's CLI with the model registered), offline.
    Slow (15-35 s each): lm_eval's command line indexes its ~14k built-in task YAMLs first."""
    import json
    import os
    import shutil
    import subprocess
    import sys

    export_dir, tasks_dir, want = exported_with_tasks
    script = shutil.which("serengeti-lm-eval", path=os.pathsep.join([str(Path(sys.executable).parent),
                                                                        os.environ.get("PATH", "")]))
    cmd = [script] if script else [sys.executable, "-c", "from serengeti.evaluate.lm_eval_adapter import cli; cli()"]
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", HF_DATASETS_CACHE=str(tmp_path / "hf"))
    res = subprocess.run(cmd + ["--model", "serengeti", "--model_args", f"pretrained={export_dir}", "--device", "cpu",
                                "--include_path", str(tasks_dir), "--tasks", "tiny_mc,tiny_roll",
                                "--output_path", str(tmp_path / "out")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    (result_file,) = (tmp_path / "out").rglob("results_*.json")
    _check(json.loads(result_file.read_text())["results"], want)


def test_evaluate_py_lm_eval_errors_are_one_line(exported_with_tasks, tmp_path):
    from conftest import compose_eval_cfg as eval_cfg

    from serengeti.evaluate.run import main as evaluate_main

    export_dir, tasks_dir, _ = exported_with_tasks
    with pytest.raises(SystemExit, match=r"^error: prefix_token_id=100000 is not a token id in \[0, \d+\)$"):
        evaluate_main(eval_cfg(["task=lm_eval", f"ckpt={export_dir}", f"include_path={tasks_dir}", "tasks=[tiny_mc]",
                                "prefix_token_id=100000", "device=cpu"], tmp_path))
    with pytest.raises(SystemExit, match=r"^error: include_path=.*nowhere: not a directory"):
        evaluate_main(eval_cfg(["task=lm_eval", f"ckpt={export_dir}", f"include_path={tmp_path / 'nowhere'}",
                                "tasks=[tiny_mc]", "device=cpu"], tmp_path))


def test_cuda_device_falls_back_to_the_cpu_without_cuda(char_tok, monkeypatch, caplog):
    """lm_eval's --device cuda on a CPU machine: the adapter scores on the CPU instead of crashing."""
    pytest.importorskip("lm_eval")
    import torch

    from serengeti.training.accelerator import usable_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert (usable_device(None), usable_device("auto"), usable_device("cpu")) == ("cpu", "cpu", "cpu")
    assert usable_device("cuda:1") == "cpu" and "CUDA is not available here" in caplog.text
    lm = lm_eval_adapter.SerengetiLM(model=tiny_lm("hyena", char_tok.vocab_size), tokenizer=char_tok, device="cuda")
    assert lm.scorer.model_device.type == "cpu"
