"""serengeti models through ``transformers``: AutoModelForCausalLM / AutoTokenizer / generate / pipeline.

Oracles: the backbone loaded by ``LMHeadModel.from_pretrained`` (logits), ``serengeti.generate`` (greedy
tokens), the float64 reference forwards of tests/test_convert.py (converted H3/Hyena weights), the
``CharTokenizer`` / ``BPETokenizer`` encodings, and ``serengeti-lm-eval``'s numbers for lm_eval ``hf``.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, pipeline

from conftest import ROOT, SHARED_DATA, compose_cfg, mixer_overrides
from serengeti import LMHeadModel
from serengeti.errors import CheckpointError
from serengeti.data.tokenizers import tokenizer_record
from serengeti.data.tokenizers import CharTokenizer
from serengeti.models.generation import generate
from serengeti.models.hf import SerengetiCache, SerengetiConfig, SerengetiForCausalLM
from serengeti.models.backbone import build_model

pytestmark = pytest.mark.usefixtures("one_thread")

V, L_MAX = 13, 40
#: every mixer of configs/model/mixer/, a hybrid (H3 with attention in block 1) and both Transformers
MODELS = {name: mixer_overrides(name) for name in ("attention", "h3", "hyena", "longconv", "hyena_s5", "s5")}
MODELS["hybrid_h3"] = ["model=hybrid_h3", "model.n_layer=3", "model.attn_layer_idx=[1]", "model.attn_cfg.num_heads=2"]
MODELS["transformer"] = ["model=transformer", "model.attn_cfg.num_heads=2"]  # learned positions (bounded by l_max)
MODELS["transformer_pp"] = ["model=transformer_pp", "model.attn_cfg.num_heads=2"]  # rotary, RMSNorm, SwiGLU
TEXT = "the quick brown fox jumps over the lazy dog.\npack my box with five dozen liquor jugs!"


def model_cfg(select: list[str], vocab_size: int = V, l_max: int = L_MAX) -> dict:
    overrides = [*select, "model.d_model=16", f"model.vocab_size={vocab_size}", f"model.l_max={l_max}",
                 "model.pad_vocab_size_multiple=8"]
    if not any(o.startswith("model.n_layer") for o in select):
        overrides.append("model.n_layer=2")
    return OmegaConf.to_container(compose_cfg(overrides).model, resolve=True)


def tiny_export(tmp: Path, select: list[str], *, tokenizer=None, vocab_size: int = V, l_max: int = L_MAX,
                name: str = "export") -> Path:
    """An export of a small model whose parameters are perturbed away from their init (every path matters)."""
    mcfg = model_cfg(select, vocab_size, l_max)
    torch.manual_seed(0)
    model = build_model(mcfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
        model.word_embeddings.weight.mul_(20)  # logits far from ties, so greedy paths are stable
    cfg = {"model": mcfg, "tokenizer": tokenizer_record(tokenizer, vocab_size)}
    return model.save_pretrained(tmp / name, config=cfg, tokenizer=tokenizer)


@pytest.mark.parametrize("name", list(MODELS))
def test_every_mixer_loads_and_generates_like_serengeti(name, tmp_path):
    out = tiny_export(tmp_path, MODELS[name])
    assert json.loads((out / "config.json").read_text())["model_type"] == "serengeti"
    model = AutoModelForCausalLM.from_pretrained(out)
    ref = LMHeadModel.from_pretrained(out)
    assert isinstance(model, SerengetiForCausalLM) and not model.training
    ids = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(ids).logits
        assert logits.shape == (2, 9, V)  # the embedding's padding rows are not logits
        assert torch.equal(logits, ref(ids)[..., :V])
    want = generate(ref, ids, 12, temperature=0.0).tokens
    got = model.generate(ids, max_new_tokens=12, do_sample=False, return_dict_in_generate=True)
    assert torch.equal(got.sequences[:, :9], ids) and torch.equal(got.sequences[:, 9:], want)
    assert isinstance(got.cache, SerengetiCache) and got.cache.get_seq_length() == 9 + 12 - 1  # prefill + steps
    # sampling from the single most likely token is greedy decoding through the sampling path
    torch.manual_seed(0)
    top1 = model.generate(ids, max_new_tokens=12, do_sample=True, top_k=1, temperature=0.7)
    assert torch.equal(top1[:, 9:], want)
    sampled = model.generate(ids, max_new_tokens=12, do_sample=True, top_k=3, temperature=1.5)
    assert sampled.shape == (2, 21) and int(sampled.max()) < V


def test_cache_continues_like_the_full_forward(tmp_path):
    """A cache from forward(use_cache=True) continues token by token and several at once."""
    model = AutoModelForCausalLM.from_pretrained(tiny_export(tmp_path, MODELS["hybrid_h3"]))
    ids = torch.randint(0, V, (1, 14), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :6], use_cache=True)
        assert isinstance(out.cache, SerengetiCache) and out.cache.get_seq_length() == 6
        one = model(ids[:, 6:7], cache=out.cache).logits
        rest = model(ids[:, 7:], cache=out.cache).logits
    torch.testing.assert_close(torch.cat([out.logits, one, rest], 1), full, rtol=1e-4, atol=1e-4)
    assert out.cache.get_seq_length() == 14
    greedy = model.generate(ids[:, :6], max_new_tokens=5, do_sample=False)
    assert torch.equal(model.generate(ids[:, :6], max_new_tokens=5, do_sample=False, use_cache=False), greedy)
    assert model.generate(ids[:, :6], max_new_tokens=5, do_sample=True, num_return_sequences=3).shape == (3, 11)


def test_loss_and_tuple_outputs(tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_export(tmp_path, MODELS["h3"]))
    ids = torch.randint(0, V, (2, 8), generator=torch.Generator().manual_seed(3))
    labels = ids.clone()
    labels[0, 3] = -100
    out = model(ids, labels=labels)
    keep = labels[:, 1:] != -100
    nll = -out.logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]
    torch.testing.assert_close(out.loss, nll[keep].mean())
    loss, logits = model(ids, labels=labels, return_dict=False)[:2]
    assert torch.equal(logits, out.logits) and torch.equal(loss, out.loss)


def test_generation_errors_are_one_line(tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_export(tmp_path, MODELS["hyena"]))  # Hyena: at most l_max
    ids = torch.randint(0, V, (1, 30))
    with pytest.raises(ValueError, match=r"needs 49 positions .* maximum sequence length 40") as e:
        model.generate(ids, max_new_tokens=20)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="num_beams=1"):
        model.generate(ids[:, :5], max_new_tokens=3, num_beams=2)
    with pytest.raises(ValueError, match="attention_mask has zeros"):
        model(ids[:, :4], attention_mask=torch.tensor([[0, 1, 1, 1]]))


# -- loading options, hostile folders -------------------------------------------------------------------

def test_dtype_and_device_map(tmp_path):
    out = tiny_export(tmp_path, MODELS["s5"])
    ids = torch.randint(0, V, (1, 6))
    ref = LMHeadModel.from_pretrained(out).double()
    for kw in ({"torch_dtype": torch.float64}, {"dtype": "float64", "device_map": "cpu"},
               {"dtype": torch.float64, "device_map": {"": "cpu"}}):
        model = AutoModelForCausalLM.from_pretrained(out, **kw)
        assert model.backbone.word_embeddings.weight.dtype == torch.float64, kw
        assert torch.equal(model(ids).logits, ref(ids)[..., :V])
    assert AutoModelForCausalLM.from_pretrained(out, torch_dtype="auto").dtype == torch.float32
    assert AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).generate(ids, max_new_tokens=3).shape == (1, 9)
    for kw, match in (({"device_map": {"backbone.layers.0": "cpu"}}, "one device"), ({"dtype": "int8"}, "floating"),
                      ({"device_map": "nowhere"}, "not a device"), ({"load_in_8bit": True}, "'load_in_8bit'"),
                      ({"output_loading_info": True}, "'output_loading_info'")):
        with pytest.raises(ValueError, match=match) as e:
            AutoModelForCausalLM.from_pretrained(out, **kw)
        assert "\n" not in str(e.value)


def _flag_payload(folder: Path, flag: Path) -> None:
    """Python files that would create ``flag`` if anything imported them."""
    code = f"open({str(flag)!r}, 'w').write('ran')\n"
    for name in ("modeling_evil.py", "configuration_evil.py"):
        (folder / name).write_text(code)


@pytest.mark.parametrize("case", ["auto_map", "callable_target", "unregistered_option"])
def test_hostile_config_is_refused_without_running_code(case, tmp_path):
    out = tiny_export(tmp_path, MODELS["attention"])
    flag = tmp_path / "ran.flag"
    _flag_payload(out, flag)
    cfg = json.loads((out / "config.json").read_text())
    if case == "auto_map":
        cfg["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig", "AutoModelForCausalLM": "modeling_evil.Evil"}
        match = "'auto_map' names code"
    elif case == "callable_target":
        cfg["model"]["mixer"] = {"_target_": "builtins.exec", "_partial_": True}
        match = "builtins.exec.* not a registered class"
    else:
        cfg["model"]["mixer"]["__init__"] = "x"
        match = "not allowed in a stored config|only plain options"
    (out / "config.json").write_text(json.dumps(cfg))
    for trust in (None, True):
        with pytest.raises(CheckpointError, match=match) as e:
            AutoModelForCausalLM.from_pretrained(out, trust_remote_code=trust)
        assert "\n" not in str(e.value)
    assert not flag.exists()


@pytest.mark.parametrize("key,value", [("vocab_size", 16_000_000), ("n_layer", 100_000)])
def test_absurd_stored_sizes_are_refused_before_allocation(key, value, tmp_path):
    """The transformers path runs the shared stored-size check (its memory bound: tests/test_untrusted_files.py)."""
    out = tiny_export(tmp_path, MODELS["h3"])
    cfg = json.loads((out / "config.json").read_text())
    cfg["model"][key] = value
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=f"^{out}: ") as e:
        AutoModelForCausalLM.from_pretrained(out)
    assert "\n" not in str(e.value)


def test_old_exports_and_training_checkpoints_load(tmp_path):
    """An export without model_type (what earlier releases wrote) and a .ckpt load through serengeti's class."""
    out = tiny_export(tmp_path, MODELS["longconv"])
    cfg = json.loads((out / "config.json").read_text())
    old = {k: cfg[k] for k in ("format", "version", "model", "tokenizer") if k in cfg}
    (out / "config.json").write_text(json.dumps(old))
    ref = LMHeadModel.from_pretrained(out)
    ids = torch.randint(0, V, (1, 7))
    with pytest.raises(ValueError, match="model_type"):
        AutoModelForCausalLM.from_pretrained(out)  # transformers alone cannot tell what it is
    for model in (SerengetiForCausalLM.from_pretrained(out),
                  AutoModelForCausalLM.from_pretrained(out, config=SerengetiConfig.from_pretrained(out))):
        assert torch.equal(model(ids).logits, ref(ids)[..., :V])
    state = {f"model.{k}": v for k, v in ref.state_dict().items()}
    torch.save({"state_dict": state, "hyper_parameters": {"cfg": {"model": old["model"]}}}, tmp_path / "last.ckpt")
    model = SerengetiForCausalLM.from_pretrained(tmp_path / "last.ckpt")
    assert torch.equal(model(ids).logits, ref(ids)[..., :V])
    model.save_pretrained(tmp_path / "re-export")  # a .ckpt becomes a folder AutoModelForCausalLM reads
    assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path / "re-export")(ids).logits, ref(ids)[..., :V])


def test_a_checkpoint_from_training_round_trips(tmp_path, tmp_path_factory):
    """A last.ckpt written by train.py (Tiny Shakespeare, characters), directly and through its export."""
    from test_pretrained import shared_run

    from serengeti import load_tokenizer
    from serengeti.models.pretrained import export

    ckpt = shared_run(tmp_path_factory, "char")["ckpt"]
    ref = LMHeadModel.from_pretrained(ckpt)
    out = export(ckpt, tmp_path / "export")
    tok, hf_tok = load_tokenizer(ckpt), AutoTokenizer.from_pretrained(out)
    text = "First Citizen:\nBefore we proceed any further, hear me speak."
    assert hf_tok(text)["input_ids"] == tok.encode_batch([text])[0]
    ids = torch.tensor(tok.encode_batch([text[:20]]))
    want = generate(ref, ids, 8, temperature=0.0).tokens
    for model in (SerengetiForCausalLM.from_pretrained(ckpt), AutoModelForCausalLM.from_pretrained(out)):
        assert torch.equal(model(ids).logits, ref(ids)[..., :ref.vocab_size])
        assert torch.equal(model.generate(ids, max_new_tokens=8, do_sample=False)[:, 20:], want)


@pytest.mark.parametrize("src,layers", [("safari-h3", ("h3", "attn")), ("safari-hyena", ("hyena", "hyena"))])
def test_converted_reference_weights(src, layers, tmp_path):
    """Converted H3/Hyena reference weights: same logits as LMHeadModel and as the float64 reference forward."""
    import test_convert as tc

    g = torch.Generator().manual_seed(0)
    sd = tc.ref_backbone(2, g)
    builders = {"h3": tc.ref_h3_layer, "attn": tc.ref_attn_layer, "hyena": tc.ref_hyena_layer}
    for i, kind in enumerate(layers):
        builders[kind](sd, f"backbone.layers.{i}.mixer.", g)
    torch.save(sd, tmp_path / "ref.pt")
    from serengeti.convert import convert

    out = convert(src, tmp_path / "ref.pt", tmp_path / "out", vocab_size=tc.VOCAB, **({"num_heads": 2} if src == "safari-h3" else {}))
    model = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(model(tc.IDS).logits, LMHeadModel.from_pretrained(out)(tc.IDS)[..., :tc.VOCAB])
    refs = {"h3": lambda p, x: tc.h3_ref(sd, p, x), "attn": lambda p, x: tc.attn_ref(sd, p, x, 2),
            "hyena": lambda p, x: tc.hyena_ref(sd, p, x, 2, True)}
    want = tc.lm_ref(sd, tc.IDS, [refs[k] for k in layers])[..., :tc.VOCAB]
    got = AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float64)(tc.IDS).logits
    torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-8)


# -- saving ------------------------------------------------------------------------------------------

def test_save_pretrained_follows_transformers(tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_export(tmp_path, MODELS["h3"]))
    ids = torch.randint(0, V, (1, 5))
    empty = tmp_path / "empty"
    empty.mkdir()
    model.save_pretrained(empty)  # an existing empty folder, as every transformers user passes
    (empty / "README.md").write_text("my notes")
    model.save_pretrained(empty)  # our own export again: updated, other files kept
    assert (empty / "README.md").read_text() == "my notes"
    assert sorted(p.name for p in empty.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert torch.equal(AutoModelForCausalLM.from_pretrained(empty)(ids).logits, model(ids).logits)
    (tmp_path / "empty2").mkdir()
    LMHeadModel.from_pretrained(empty).save_pretrained(tmp_path / "empty2")  # serengeti's own writer too
    assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path / "empty2")(ids).logits, model(ids).logits)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "config.json").write_text('{"model_type": "gpt2"}')
    (foreign / "model.safetensors").write_text("x")
    with pytest.raises(CheckpointError, match="holds another model's model.safetensors, config.json; not replacing") as e:
        model.save_pretrained(foreign, overwrite=False)
    assert "\n" not in str(e.value) and (foreign / "config.json").read_text() == '{"model_type": "gpt2"}'
    model.save_pretrained(foreign)  # the transformers default: replace the files of the same names
    assert torch.equal(AutoModelForCausalLM.from_pretrained(foreign)(ids).logits, model(ids).logits)
    with pytest.raises(ValueError, match="push_to_hub"):
        model.save_pretrained(tmp_path / "hub", push_to_hub=True)


# -- tokenizers ----------------------------------------------------------------------------------------

def test_char_tokenizer_round_trip(tmp_path):
    tok = CharTokenizer.from_text(TEXT + "\t é中", eos=True)
    out = tiny_export(tmp_path, MODELS["hyena_s5"], tokenizer=tok, vocab_size=tok.vocab_size)
    hf = AutoTokenizer.from_pretrained(out)
    for text in (TEXT, " lazy\n\tdog  é中 ", "", "\n\n"):
        ids = hf(text)["input_ids"]
        assert ids == tok.encode_batch([text])[0]
        assert hf.decode(ids) == text == tok.decode(ids)
    assert hf.eos_token_id == tok.eos_id == AutoConfig.from_pretrained(out).eos_token_id
    with pytest.raises(Exception, match="UNK|vocabulary"):  # a character outside the vocabulary, as CharTokenizer
        hf("Z")


def test_bpe_tokenizer_round_trip(tmp_path):
    gpt2 = SHARED_DATA / "gpt2"
    if not gpt2.is_dir():
        pytest.skip(f"shared GPT-2 tokenizer not found at {gpt2}")
    from serengeti.data.tokenizers import load_tokenizer

    tok = load_tokenizer(gpt2)
    out = tiny_export(tmp_path, MODELS["attention"], tokenizer=tok, vocab_size=tok.vocab_size)
    hf = AutoTokenizer.from_pretrained(out)
    text = TEXT + " <|endoftext|> Ünïcode  spaces\n"
    assert hf(text)["input_ids"] == tok.encode_batch([text])[0]
    assert hf.decode(tok.encode_batch([text])[0]) == text and hf.eos_token_id == tok.eos_id


def test_pipeline_generates_what_serengeti_generates(tmp_path):
    tok = CharTokenizer.from_text(TEXT)
    out = tiny_export(tmp_path, MODELS["hybrid_h3"], tokenizer=tok, vocab_size=tok.vocab_size)
    prompt = "the lazy "
    ref = LMHeadModel.from_pretrained(out)
    want = tok.decode(generate(ref, torch.tensor(tok.encode_batch([prompt])), 10, temperature=0.0).tokens[0].tolist())
    pipe = pipeline("text-generation", model=str(out), device="cpu")
    assert pipe(prompt, max_new_tokens=10, do_sample=False)[0]["generated_text"] == prompt + want


# -- registration, lm-evaluation-harness ------------------------------------------------------------------

def test_import_serengeti_registers_the_auto_classes():
    """``import serengeti`` loads neither torch nor transformers; importing transformers afterwards registers."""
    code = ("import serengeti, sys; print('torch' in sys.modules, 'transformers' in sys.modules); "
            "from transformers import AutoConfig, AutoModelForCausalLM; "
            "cls = type(AutoConfig.for_model('serengeti')); "
            "print(cls.__name__, AutoModelForCausalLM._model_mapping[cls].__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.stdout.split() == ["False", "False", "SerengetiConfig", "SerengetiForCausalLM"], out.stderr[-2000:]


def test_lm_eval_hf_model_equals_serengeti_lm_eval(tmp_path):
    """lm_eval's own ``hf`` model on an export gives serengeti-lm-eval's numbers (local tasks, offline)."""
    pytest.importorskip("lm_eval")
    import lm_eval

    from serengeti.evaluate.lm_eval_adapter import run_lm_eval, task_manager

    tok = CharTokenizer.from_text(TEXT, eos=True)
    out = tiny_export(tmp_path, MODELS["hyena"], tokenizer=tok, vocab_size=tok.vocab_size, l_max=16)
    tasks = _local_tasks(tmp_path / "tasks")
    names = ["tiny_mc", "tiny_ppl"]
    mine = run_lm_eval(LMHeadModel.from_pretrained(out), tok, names, include_path=tmp_path / "tasks", batch_size=2)
    theirs = lm_eval.simple_evaluate(model="hf", model_args={"pretrained": str(out)}, tasks=names, device="cpu",
                                     batch_size=2, task_manager=task_manager(tasks, names))
    for name, metric in (("tiny_mc", "acc,none"), ("tiny_ppl", "word_perplexity,none"), ("tiny_ppl", "bits_per_byte,none")):
        assert theirs["results"][name][metric] == pytest.approx(mine["results"][name][metric], rel=1e-5), (name, metric)


def _local_tasks(root: Path) -> Path:
    root.mkdir()
    mc = [{"question": "the quick brown", "choices": [" fox", " dog", " box"], "label": 0},
          {"question": "pack my box with five", "choices": [" dozen", " lazy"], "label": 0},
          {"question": "jumps over the", "choices": [" lazy", " quick", " jugs!"], "label": 0}]
    docs = [{"text": TEXT}, {"text": "the lazy dog jumps over the quick brown fox. pack my jugs with liquor!"}]
    (root / "mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in mc))
    (root / "ppl.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (root / "tiny_mc.yaml").write_text(
        f"task: tiny_mc\ndataset_path: json\ndataset_kwargs:\n  data_files: {{test: {root / 'mc.jsonl'}}}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{label}}'\nmetric_list: [{metric: acc}]\n")
    (root / "tiny_ppl.yaml").write_text(
        f"task: tiny_ppl\ndataset_path: json\ndataset_kwargs:\n  data_files: {{test: {root / 'ppl.jsonl'}}}\n"
        "test_split: test\noutput_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
        "metric_list: [{metric: word_perplexity}, {metric: bits_per_byte}]\n")
    return root
