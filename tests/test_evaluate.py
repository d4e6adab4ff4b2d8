"""evaluate.py end to end on CPU: train -> evaluate (= logged val loss) -> export -> evaluate -> generate; errors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import compose_cfg, compose_eval_cfg
from entry_runs import run_subprocess
from serengeti.errors import CheckpointError, EvalError
from serengeti.evaluate.run import main as evaluate_main, run as evaluate
from serengeti.training.run import run as train


eval_cfg = compose_eval_cfg


_QUIET = ["logger=none", "trainer.enable_progress_bar=false", "~callbacks.rich_model_summary",
          "~callbacks.rich_progress_bar", "test_after_fit=false"]


def _train(tmp_path: Path, overrides: list[str]) -> tuple[dict, Path]:
    """Train until one validation pass at the very end; return the final metrics and last.ckpt."""
    cfg = compose_cfg(_QUIET + overrides, output_dir=tmp_path / "run")
    metrics = train(cfg)
    return metrics, tmp_path / "run" / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ar")
    # 32 examples / batch 8 = 4 steps: the run ends with the epoch's validation pass
    metrics, ckpt = _train(tmp, ["dataset.num_examples=32", "dataset.num_test_examples=16", "dataset.batch_size=8",
                                 "trainer.max_steps=4"])
    assert "val/loss" in metrics, "the tiny run must end with a validation pass"
    return metrics, ckpt


def test_evaluate_export_generate_round_trip(trained, tmp_path):
    metrics, ckpt = trained
    res = evaluate(eval_cfg([f"ckpt={ckpt}"], tmp_path / "e1"))
    assert abs(res["val/loss"] - metrics["val/loss"]) <= 1e-4
    assert abs(res["val/accuracy"] - metrics["val/accuracy"]) <= 1e-4
    saved = json.loads((tmp_path / "e1" / "metrics.json").read_text())
    assert saved["val/loss"] == res["val/loss"] and saved["split"] == "val"

    out = tmp_path / "export"
    evaluate(eval_cfg(["task=export", f"ckpt={ckpt}", f"out={out}"], tmp_path / "x"))
    res2 = evaluate(eval_cfg([f"ckpt={out}", "batch_size=5", f"out={tmp_path / 'm2.json'}"], tmp_path / "e2"))
    assert abs(res2["val/loss"] - metrics["val/loss"]) <= 1e-4 and (tmp_path / "m2.json").is_file()

    gen = evaluate(eval_cfg(["task=generate", f"ckpt={out}", "prompt='1 2 3 4'", "max_new_tokens=5", "temperature=0"],
                            tmp_path / "g"))
    assert len(gen["tokens"][0]) == 5 and all(0 <= t < 10 for t in gen["tokens"][0])
    sampled = [evaluate(eval_cfg(["task=generate", f"ckpt={ckpt}", "prompt='1 2'", "max_new_tokens=8", "seed=3",
                                  "top_k=4", "top_p=0.9"], tmp_path / "g")) for _ in range(2)]
    assert sampled[0]["tokens"] == sampled[1]["tokens"]  # seeded


def test_evaluate_errors(trained, tmp_path):
    _, ckpt = trained
    with pytest.raises(EvalError, match="task='nope' is not one of"):
        evaluate(eval_cfg(["task=nope", f"ckpt={ckpt}"], tmp_path))
    with pytest.raises(CheckpointError, match="checkpoint not found: .*missing.ckpt"):
        evaluate(eval_cfg([f"ckpt={tmp_path / 'missing.ckpt'}"], tmp_path))
    with pytest.raises(EvalError, match="ckpt is not set"):
        evaluate(eval_cfg([], tmp_path))
    with pytest.raises(EvalError, match="vocabulary has 20 ids.*trained on 10"):
        evaluate(eval_cfg([f"ckpt={ckpt}", "dataset=induction_head"], tmp_path))
    with pytest.raises(EvalError, match="longer than the model's maximum sequence length 66"):
        evaluate(eval_cfg(["task=generate", f"ckpt={ckpt}", "prompt='" + " ".join(["1"] * 70) + "'"], tmp_path))
    with pytest.raises(EvalError, match="exceeds the model's maximum sequence length 66"):
        evaluate(eval_cfg(["task=generate", f"ckpt={ckpt}", "prompt='1 2'", "max_new_tokens=70"], tmp_path))
    with pytest.raises(EvalError, match="^num_samples=1000000000 x .* lower num_samples or max_new_tokens$"):
        evaluate(eval_cfg(["task=generate", f"ckpt={ckpt}", "prompt='1 2'", "num_samples=1000000000"], tmp_path))
    with pytest.raises(EvalError, match="token ids separated by spaces"):
        evaluate(eval_cfg(["task=generate", f"ckpt={ckpt}", "prompt=hello"], tmp_path))
    with pytest.raises(EvalError, match="outside the vocabulary"):
        evaluate(eval_cfg(["task=generate", f"ckpt={ckpt}", "prompt='12'"], tmp_path))
    with pytest.raises(EvalError, match="no text tokenizer"):
        evaluate(eval_cfg(["task=lm_eval", f"ckpt={ckpt}", "tasks=[piqa]"], tmp_path))


def test_length_independent_model_is_scored_beyond_its_training_length(trained, tmp_path):
    """A Hyena-S5 trained on 8-token recall is evaluated on 40 tokens and samples past its l_max;
    Hyena (filters sized by l_max = 66) is refused with the limit in the message."""
    metrics, ckpt = _train(tmp_path, ["model=hyena_s5", "model.d_model=16", "model.mixer.ssm_size=4",
                                      "model.mixer.blocks=1", "dataset.seq_len=8", "dataset.num_examples=32",
                                      "dataset.num_test_examples=16", "dataset.batch_size=8", "trainer.max_steps=4"])
    longer = ["dataset=associative_recall", "dataset.seq_len=40", "dataset.num_test_examples=16"]
    res = evaluate(eval_cfg([f"ckpt={ckpt}", *longer], tmp_path / "e"))
    assert 0.0 <= res["val/accuracy"] <= 1.0 and res["val/loss"] > 0
    gen = evaluate(eval_cfg(["task=generate", f"ckpt={ckpt}", "prompt='1 2'", "max_new_tokens=30"], tmp_path / "g"))
    assert len(gen["tokens"][0]) == 30  # 31 positions, past l_max = 10
    with pytest.raises(EvalError, match="130 positions, more than the model's maximum sequence length 66"):
        evaluate(eval_cfg([f"ckpt={trained[1]}", "dataset=associative_recall", "dataset.seq_len=128"], tmp_path / "h"))


def test_char_model_text_in_text_out(shared_data, tmp_path):
    """Tiny Shakespeare (char tokenizer): the tokenizer travels in the checkpoint and the export."""
    text = shared_data / "tinyshakespeare" / "input.txt"
    metrics, ckpt = _train(tmp_path, ["dataset=tinyshakespeare", f"dataset.path={text}", "dataset.seq_len=32",
                                      "dataset.batch_size=4", "dataset.max_eval_tokens=2048", "trainer.max_steps=3",
                                      "trainer.limit_train_batches=3", f"paths.cache_dir={tmp_path / 'cache'}",
                                      "model=transformer", "model.d_model=16"])
    res = evaluate(eval_cfg([f"ckpt={ckpt}"], tmp_path / "e"))
    assert abs(res["val/loss"] - metrics["val/loss"]) <= 1e-4
    out = tmp_path / "export"
    evaluate(eval_cfg(["task=export", f"ckpt={ckpt}", f"out={out}"], tmp_path / "x"))
    gen = evaluate(eval_cfg(["task=generate", f"ckpt={out}", "prompt='ROMEO:'", "max_new_tokens=10", "seed=0"],
                            tmp_path / "g"))
    assert len(gen["texts"][0]) == 10  # one character per token, decoded by the checkpoint's own alphabet
    with pytest.raises(EvalError, match="prompt: character '€' is not in the character vocabulary"):
        evaluate(eval_cfg(["task=generate", f"ckpt={out}", "prompt='€'"], tmp_path / "g"))
    wikitext = shared_data / "wikitext" / "wikitext-2-raw"
    with pytest.raises(EvalError, match="50257 ids .*trained on 65"):
        evaluate(eval_cfg([f"ckpt={ckpt}", "dataset=wikitext2", f"dataset.path={wikitext}",
                           f"dataset.tokenizer={shared_data / 'gpt2'}", "dataset.train_split=null"], tmp_path / "w"))


def test_loss_by_position_matches_a_plain_forward_pass(tmp_path):
    """position_buckets: each val/loss_pos_* equals the per-target cross-entropy of a plain forward pass,
    bucketed by hand over the scored targets (sliding windows mask the first targets of all windows but
    the first, the last window is padded); their token-weighted mean is val/loss."""
    import random

    import torch
    import torch.nn.functional as F

    from serengeti.evaluate.perplexity import build_datamodule
    from serengeti.models.pretrained import load_model

    rng = random.Random(0)
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "then", "ran", "off", "to", "see", "dog"]
    for name, n in (("train.txt", 400), ("valid.txt", 90)):
        (tmp_path / name).write_text(" ".join(rng.choice(words) for _ in range(n)) + "\n")
    _, ckpt = _train(tmp_path, ["dataset=text_files", f"dataset.train={tmp_path / 'train.txt'}",
                                f"dataset.validation={tmp_path / 'valid.txt'}", "dataset.tokenizer=char",
                                "dataset.seq_len=32", "dataset.eval_stride=24", "dataset.batch_size=4",
                                "trainer.max_steps=2", "trainer.limit_train_batches=2",
                                f"paths.cache_dir={tmp_path / 'cache'}", "model=transformer", "model.d_model=16"])
    buckets = [4, 10, 20, 40]  # [40, end) lies past the 32-token window: no scored target, not reported
    res = evaluate(eval_cfg([f"ckpt={ckpt}", "batch_size=3", f"position_buckets=[{','.join(map(str, buckets))}]"],
                            tmp_path / "e"))

    model, ckpt_cfg, _ = load_model(ckpt, load_tokenizer=False)
    dm = build_datamodule(ckpt_cfg["dataset"], 3)
    dm.prepare_data()
    dm.setup("validate")
    edges = [0, *buckets, float("inf")]
    total, count = [0.0] * (len(edges) - 1), [0] * (len(edges) - 1)
    with torch.no_grad():
        for inputs, targets in dm.val_dataloader():
            ce = F.cross_entropy(model(inputs).float().transpose(1, 2), targets, reduction="none")  # (B, L)
            for b, t in zip(*torch.nonzero(targets != -100, as_tuple=True)):
                j = next(j for j in range(len(edges) - 1) if edges[j] <= t < edges[j + 1])
                total[j] += float(ce[b, t])
                count[j] += 1
    assert count[0] > 0 and count[-1] == 0 and sum(count) == len(dm.role_tokens("val")) - 1  # each target once
    expected = {f"val/loss_pos_{a}_{b}": tot / n for a, b, tot, n in zip([0, *buckets], [*buckets, "end"], total, count)
                if n > 0}
    assert {k for k in res if k.startswith("val/loss_pos_")} == set(expected) == \
        {"val/loss_pos_0_4", "val/loss_pos_4_10", "val/loss_pos_10_20", "val/loss_pos_20_40"}
    for key, value in expected.items():
        assert res[key] == pytest.approx(value, abs=1e-6), key
    weighted = sum(res[f"val/loss_pos_{a}_{b}"] * n for a, b, n in zip([0, *buckets], buckets, count))
    assert weighted / sum(count) == pytest.approx(res["val/loss"], abs=1e-6)
    saved = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert saved["val/loss_pos_0_4"] == res["val/loss_pos_0_4"]
    plain = evaluate(eval_cfg([f"ckpt={ckpt}", "batch_size=3"], tmp_path / "p"))
    assert plain["val/loss"] == res["val/loss"] and not any(k.startswith("val/loss_pos_") for k in plain)


def test_main_exits_with_the_message(tmp_path):
    with pytest.raises(SystemExit, match="error: checkpoint not found: .*none.ckpt"):
        evaluate_main(eval_cfg([f"ckpt={tmp_path / 'none.ckpt'}"], tmp_path))
    with pytest.raises(SystemExit, match="error: task='nope'"):
        evaluate_main(eval_cfg(["task=nope"], tmp_path))


@pytest.mark.slow  # a fresh interpreter importing torch: seconds alone, much longer on a loaded machine
def test_cli_reports_bad_input(tmp_path):
    res = run_subprocess("evaluate.py", [f"ckpt={tmp_path / 'none.ckpt'}", f"hydra.run.dir={tmp_path / 'run'}"],
                         cwd=tmp_path, timeout=240)
    assert res.returncode != 0 and "error: checkpoint not found" in res.stderr and "none.ckpt" in res.stderr


@pytest.mark.slow  # one tiny training run per mixer; the default suite covers the pipeline with the Transformer
@pytest.mark.parametrize("mixer", ["h3", "hyena", "longconv", "hyena_s5"])
def test_train_evaluate_generate_every_mixer(mixer, tmp_path):
    metrics, ckpt = _train(tmp_path, [f"model={mixer}", "model.d_model=16", "dataset.num_examples=32",
                                      "dataset.num_test_examples=16", "dataset.batch_size=8", "trainer.max_steps=4"])
    res = evaluate(eval_cfg([f"ckpt={ckpt}"], tmp_path / "e"))
    assert abs(res["val/loss"] - metrics["val/loss"]) <= 1e-4
    out = tmp_path / "export"
    evaluate(eval_cfg(["task=export", f"ckpt={ckpt}", f"out={out}"], tmp_path / "x"))
    assert abs(evaluate(eval_cfg([f"ckpt={out}"], tmp_path / "e2"))["val/loss"] - metrics["val/loss"]) <= 1e-4
    gen = evaluate(eval_cfg(["task=generate", f"ckpt={out}", "prompt='1 2 3'", "max_new_tokens=6"], tmp_path / "g"))
    assert len(gen["tokens"][0]) == 6


def test_metrics_are_printed_before_they_are_written(trained, tmp_path, monkeypatch, capsys):
    """A write that fails after a long evaluation still leaves the numbers on screen, and ends in one line."""
    _, ckpt = trained

    import serengeti.evaluate.run as run_module

    def disk_full(path, text):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(run_module, "atomic_write_text", disk_full)  # the up-front write test still succeeds
    with pytest.raises(EvalError, match=r"cannot write .*(config_resolved.yaml|metrics.json) \(No space left on device\); "
                                        r"the results are printed"):
        evaluate(eval_cfg([f"ckpt={ckpt}", f"out={tmp_path / 'e' / 'metrics.json'}"], tmp_path / "e"))
    assert "val/loss" in capsys.readouterr().out


# --- scoring at another sequence length --------------------------------------------------------------------
def _untrained_ckpt(tmp_path: Path, overrides: list[str]) -> Path:
    """A ``.ckpt`` laid out as train.py writes it (config + weights), for a model built but not trained."""
    import torch
    from omegaconf import OmegaConf

    from conftest import experiment_model_config
    from serengeti.evaluate.perplexity import build_datamodule
    from serengeti.models.backbone import build_model

    dataset_cfg = OmegaConf.to_container(compose_cfg(overrides).dataset, resolve=True)
    model_cfg = experiment_model_config(overrides, l_max=build_datamodule(dataset_cfg).l_max)
    torch.manual_seed(0)
    model = build_model(model_cfg)
    stored = {"model": model_cfg, "dataset": dataset_cfg, "tokenizer": {"kind": "ids", "vocab_size": model_cfg["vocab_size"]}}
    path = tmp_path / "m.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "hyper_parameters": {"cfg": stored}, "global_step": 0}, path)
    return path


_TINY_IH = ["experiment=synthetics/induction_head/transformer_pp", "dataset.seq_len=16", "model.d_model=16",
            "dataset.num_examples=64", "dataset.num_test_examples=24"]


def test_seq_len_scores_the_recorded_task_at_another_length(tmp_path):
    """seq_len=64 on a model trained at 16 regenerates the induction-head test set at 64 with the recorded task
    settings (only its test examples): the accuracy is the one computed by hand on those sequences."""
    import torch

    from serengeti.models.pretrained import load_model
    from serengeti.data.synthetic_datamodule import SyntheticDataModule

    ckpt = _untrained_ckpt(tmp_path, _TINY_IH)
    res = evaluate(eval_cfg([f"ckpt={ckpt}", "seq_len=64", "split=test"], tmp_path / "e"))
    assert res["seq_len"] == 64
    model, cfg, _ = load_model(ckpt)
    recorded = {k: v for k, v in cfg["dataset"].items() if k != "_target_"}
    data = SyntheticDataModule(**{**recorded, "seq_len": 64, "num_examples": 0})
    data.setup()
    inputs, targets = data.test.inputs.long(), data.test.targets.long()
    assert inputs.shape == (24, 65) and cfg["dataset"]["vocab_size"] == 20
    with torch.no_grad():
        predicted = model(inputs)[:, -1, :20].argmax(-1)
    assert res["test/accuracy"] == pytest.approx((predicted == targets[:, -1]).double().mean().item(), abs=1e-9)
    same = evaluate(eval_cfg([f"ckpt={ckpt}", "+dataset.num_test_examples=8", "split=test"], tmp_path / "s"))
    assert same["seq_len"] == 16  # partial dataset overrides apply to the recorded dataset


def test_serengeti_report_reads_evaluations_at_several_lengths(tmp_path):
    """Each evaluation's metrics.json is a run record with the scored model and dataset beside it, so the
    report tabulates a checkpoint's accuracy by test length."""
    from serengeti.report import find_runs, group_runs

    ckpt = _untrained_ckpt(tmp_path, _TINY_IH)
    scores = {L: evaluate(eval_cfg([f"ckpt={ckpt}", f"seq_len={L}", "split=test"], tmp_path / "ev" / str(L)))
              for L in (16, 32)}
    runs = find_runs([tmp_path / "ev"])
    groups = group_runs(runs, ["ckpt", "dataset.seq_len"])
    assert [g.key for g in groups] == [(str(ckpt), 16), (str(ckpt), 32)]
    for g in groups:
        assert g.values("test/accuracy") == [scores[g.key[1]]["test/accuracy"]]
        assert g.runs[0].value("model.d_model") == 16 and g.mean_of("n_params") > 0
    evaluate(eval_cfg([f"ckpt={ckpt}", f"out={tmp_path / 'elsewhere' / 'scores.json'}"], tmp_path / "o"))
    assert sorted(p.name for p in (tmp_path / "elsewhere").iterdir()) == ["scores.json"]


def test_learned_positions_refuse_a_longer_length(tmp_path):
    ckpt = _untrained_ckpt(tmp_path, [*_TINY_IH[:1], "model=transformer", *_TINY_IH[1:]])
    with pytest.raises(EvalError, match=r"^dataset sequences have 33 positions, more than the model's maximum sequence "
                                        r"length 17: learned positions end at model.max_position_embeddings=17; "
                                        r"lower dataset.seq_len$"):
        evaluate(eval_cfg([f"ckpt={ckpt}", "seq_len=32"], tmp_path / "e"))


def test_hyena_refuses_a_length_beyond_its_filters(tmp_path):
    """Hyena's implicit filters cannot simply be evaluated at more positions: their positional features are
    normalised to l_max (t = linspace(0, 1, l_max)), so a longer filter differs on the first positions too."""
    import torch

    from serengeti.mixers.hyena import PositionalEmbedding

    ckpt = _untrained_ckpt(tmp_path, ["experiment=synthetics/induction_head/hyena", *_TINY_IH[1:]])
    with pytest.raises(EvalError, match=r"33 positions, more than the model's maximum sequence length 17: Hyena "
                                        r"\(block 0\): its implicit filters are defined on model.l_max=17 positions"):
        evaluate(eval_cfg([f"ckpt={ckpt}", "seq_len=32"], tmp_path / "e"))
    short, long = PositionalEmbedding(3, 17, lr_pos_emb=0.0), PositionalEmbedding(3, 34, lr_pos_emb=0.0)
    assert not torch.allclose(short.z, long.z[:, :17])
