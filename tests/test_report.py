"""serengeti.report: aggregation over a fake multirun tree (hand-computed) and a real 2-job sweep."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from entry_runs import run_in_process
from serengeti.io.atomic import atomic_write_text
from serengeti.io.run_record import RECORD_FIELDS, RECORD_NAME
from serengeti.report import ReportError, find_runs, group_runs, main, mean_curve, mean_std, report, select_runs


def _fake_run(path: Path, mixer: str, vocab: int, seed: int, acc: float, curve: list[tuple[int, float]] = (),
              state_size: int | None = None) -> None:
    (path / ".hydra").mkdir(parents=True)
    cfg = {"seed": seed, "model": {"mixer": {"_target_": f"serengeti.mixers.{mixer}"}}, "dataset": {"vocab_size": vocab},
           "paths": {"output_dir": "${hydra:runtime.output_dir}"}}  # unresolvable outside Hydra, as in real runs
    OmegaConf.save(OmegaConf.create(cfg), path / ".hydra" / "config.yaml")
    record = {"metrics": {"test/accuracy": acc}, "steps": 100, "wall_s": 10.0 * seed, "cpu_s": 5.0, "n_params": 1000}
    if state_size is not None:
        record["state_size"] = state_size
    atomic_write_text(path / RECORD_NAME, json.dumps(record))
    if curve:
        (path / "csv" / "version_0").mkdir(parents=True)
        rows = ["step,train/loss,val/loss"] + [f"{s},0.5," for s, _ in curve] + [f"{s},,{v}" for s, v in curve]
        (path / "csv" / "version_0" / "metrics.csv").write_text("\n".join(rows) + "\n")


@pytest.fixture
def fake_multirun(tmp_path):
    """Hyena at vocab 10 (3 seeds: 0.5, 0.7, 0.9), H3 at vocab 10 (2 seeds: 1.0, 0.25), Hyena at vocab 20 (1 seed)."""
    root = tmp_path / "multirun"
    jobs = [("Hyena", 10, 1, 0.5), ("Hyena", 10, 2, 0.7), ("Hyena", 10, 3, 0.9),
            ("H3", 10, 1, 1.0), ("H3", 10, 2, 0.25), ("Hyena", 20, 1, 0.4)]
    for i, (mixer, vocab, seed, acc) in enumerate(jobs):
        curve = [(9, 2.0 + seed), (19, 1.0 + seed)] if mixer == "Hyena" and vocab == 10 else []
        _fake_run(root / str(i), mixer, vocab, seed, acc, curve)
    (root / "multirun.yaml").write_text("hydra: {}\n")
    (root / "6" / ".hydra").mkdir(parents=True)  # a job that did not finish: no metrics.json, not a run
    return root


def test_mean_std_by_hand():
    assert mean_std([0.5, 0.7, 0.9]) == pytest.approx((0.7, 0.2))
    mean, std = mean_std([3.0])
    assert mean == 3.0 and math.isnan(std)


def test_grouping_and_table(fake_multirun, tmp_path):
    runs = find_runs([fake_multirun])
    assert len(runs) == 6
    groups = group_runs(runs, ["model.mixer._target_", "dataset.vocab_size"])
    assert [g.key for g in groups] == [("serengeti.mixers.H3", 10), ("serengeti.mixers.Hyena", 10), ("serengeti.mixers.Hyena", 20)]
    h3, hyena10, _ = groups
    assert mean_std(h3.values("test/accuracy")) == pytest.approx((0.625, math.sqrt(2 * 0.375**2)))
    assert hyena10.mean_of("wall_s") == pytest.approx(20.0)
    written = report([fake_multirun], ["model.mixer._target_", "dataset.vocab_size"], "test/accuracy", tmp_path / "out",
                     x="dataset.vocab_size", curve="val/loss", ref=(0.9, "paper"))
    table = written["table"].read_text().splitlines()
    assert table[0].startswith("| model.mixer._target_ | dataset.vocab_size | test/accuracy (mean ± std) | n |")
    assert table[2].startswith("| H3 | 10 | 0.625 ± 0.53 | 2 | 100 | 1000 | 15 | 5 |")
    assert table[3].startswith("| Hyena | 10 | 0.7 ± 0.2 | 3 |")
    assert table[4].startswith("| Hyena | 20 | 0.4 | 1 |")
    for kind in ("plot", "curves"):
        assert written[kind].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_state_column_when_runs_record_a_state_size(tmp_path):
    """Runs with state_size (train.py records it) get a state column: the group's mean; older records show –."""
    for i, (mixer, state) in enumerate([("Hyena", 4480), ("Hyena", 4480), ("H3", 2048), ("S5", None)]):
        _fake_run(tmp_path / "m" / str(i), mixer, 10, i + 1, 0.5, state_size=state)
    written = report([tmp_path / "m"], ["model.mixer._target_"], "test/accuracy", tmp_path / "out")
    table = written["table"].read_text().splitlines()
    assert table[0] == "| model.mixer._target_ | test/accuracy (mean ± std) | n | steps | params | state | wall s | CPU s |"
    assert table[2].startswith("| H3 | 0.5 | 1 | 100 | 1000 | 2048 | 30 | 5 |")
    assert table[3].startswith("| Hyena | 0.5 ± 0 | 2 | 100 | 1000 | 4480 |")
    assert table[4].startswith("| S5 | 0.5 | 1 | 100 | 1000 | – |")


def test_mean_curve_over_seeds(fake_multirun):
    hyena10 = group_runs(find_runs([fake_multirun]), ["model.mixer._target_", "dataset.vocab_size"])[1]
    # CSV rows count from 0 during fit: the values logged after 10 and 20 steps
    assert mean_curve(hyena10.runs, "val/loss") == ([10, 20], [pytest.approx(4.0), pytest.approx(3.0)])


def test_bad_input_is_one_line(fake_multirun, tmp_path, capsys):
    assert main([str(fake_multirun), "--metric", "val/nope", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("report: --metric 'val/nope'") and "\n" not in err
    assert main([str(tmp_path / "missing"), "--metric", "test/accuracy", "--out", str(tmp_path / "o")]) == 2
    assert main([str(fake_multirun), "--metric", "test/accuracy", "--ref", "high", "--out", str(tmp_path / "o")]) == 2
    assert "--ref expects VALUE[:LABEL]" in capsys.readouterr().err
    with pytest.raises(ReportError, match="no readable metrics.json"):
        find_runs([tmp_path / "multirun" / "6"])


def test_unreadable_runs_are_skipped_in_one_line_each_and_counted(fake_multirun, tmp_path, capsys):
    """A damaged metrics.json, damaged YAML, a YAML alias bomb (9**9 nodes if expanded) and a record of
    the wrong shape: each run is skipped with one line naming its file; the rest are reported."""
    damaged = {"json": ("metrics.json", '{"metrics": '), "shape": ("metrics.json", '{"metrics": {"test/accuracy": "x"}}'),
               "yaml": ("config_resolved.yaml", "a: [1, 2\nb: {"),
               "bomb": ("config_resolved.yaml", 'a0: &a0 ["x","x","x","x","x","x","x","x","x"]\n' + "".join(
                   f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]\n" for i in range(1, 10)))}
    for name, (file, text) in damaged.items():
        _fake_run(fake_multirun / name, "Hyena", 10, 1, 0.5)
        (fake_multirun / name / file).write_text(text)
    assert main([str(fake_multirun), "--metric", "test/accuracy", "--out", str(tmp_path / "o")]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    skipped = sorted(line for line in err if line.startswith("report: skipped "))
    assert [line.split()[2].rstrip(":") for line in skipped] == [
        str(fake_multirun / "bomb" / "config_resolved.yaml"), str(fake_multirun / "json" / "metrics.json"),
        str(fake_multirun / "shape" / "metrics.json"), str(fake_multirun / "yaml" / "config_resolved.yaml")]
    assert "aliases" in skipped[0] and "report: 4 run(s) skipped" in err
    assert len(find_runs([fake_multirun])) == 6


def test_a_run_config_is_read_without_resolving_interpolations(tmp_path, monkeypatch):
    monkeypatch.setenv("SERENGETI_TEST_SECRET", "hunter2")
    run = tmp_path / "run"
    run.mkdir()
    (run / RECORD_NAME).write_text(json.dumps({"metrics": {"test/accuracy": 0.5}}))
    (run / "config_resolved.yaml").write_text("secret: ${oc.env:SERENGETI_TEST_SECRET}\nmodel: {l_max: 8, lr: 1e-3}\n"
                                              "width: ${model.l_max}\n")
    (r,) = find_runs([run])
    assert r.value("secret") == "${oc.env:SERENGETI_TEST_SECRET}"
    assert r.value("width") == 8 and r.value("model.lr") == 0.001 and r.value("missing.key") is None
    written = report([run], ["secret"], "test/accuracy", tmp_path / "o")
    assert "hunter2" not in written["table"].read_text()


def test_where_keeps_matching_runs(fake_multirun, tmp_path, capsys):
    runs = find_runs([fake_multirun])
    hyena20 = select_runs(runs, ["model.mixer._target_=serengeti.mixers.Hyena", "dataset.vocab_size=20"])
    assert [(r.value("model.mixer._target_"), r.value("dataset.vocab_size")) for r in hyena20] == [("serengeti.mixers.Hyena", 20)]
    assert len(select_runs(runs, ["dataset.vocab_size=10"])) == 5
    written = report([fake_multirun], ["model.mixer._target_"], "test/accuracy", tmp_path / "o", where=["dataset.vocab_size=10"])
    assert [line.split(" | ")[2] for line in written["table"].read_text().splitlines()[2:]] == ["2", "3"]  # n per mixer
    for bad, message in ((["vocab"], "--where expects KEY=VALUE, got 'vocab'"),
                         (["dataset.vocab_size=99"], "--where dataset.vocab_size=99: no run matches")):
        assert main([str(fake_multirun), "--metric", "test/accuracy", "--out", str(tmp_path / "o"),
                     *[a for w in bad for a in ("--where", w)]]) == 2
        assert capsys.readouterr().err.strip() == f"report: {message}"


def test_embed_replaces_only_its_block(fake_multirun, tmp_path, capsys):
    doc = tmp_path / "experiments.md"
    doc.write_text("intro\n<!-- report:acc -->\nold table\n<!-- /report:acc -->\nbetween\n"
                   "<!-- report:other -->\nkept\n<!-- /report:other -->\n")
    argv = [str(fake_multirun), "--by", "model.mixer._target_", "--metric", "test/accuracy", "--out", str(tmp_path / "o"),
            "--name", "acc", "--embed", str(doc)]
    assert main(argv) == 0
    table = (tmp_path / "o" / "acc.md").read_text()
    assert doc.read_text() == ("intro\n<!-- report:acc -->\n" + table + "<!-- /report:acc -->\nbetween\n"
                               "<!-- report:other -->\nkept\n<!-- /report:other -->\n")
    assert main(argv) == 0 and doc.read_text().count(table) == 1  # idempotent
    capsys.readouterr()
    assert main([*argv[:-3], "missing", "--embed", str(doc)]) == 2  # no block named "missing"
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"report: --embed {doc}: expected one block from the line '<!-- report:missing -->'") and "\n" not in err


def test_real_sweep_end_to_end(tmp_path):
    """train.py -m seed=1,2 (tiny, 4 steps) writes metrics.json per job; the report aggregates both."""
    sweep = tmp_path / "sweep"
    args = ["-m", "seed=1,2", "dataset.num_examples=64", "dataset.num_test_examples=16", "dataset.batch_size=8",
            "trainer.max_steps=4", "trainer.val_check_interval=2", "trainer.log_every_n_steps=1",
            "trainer.enable_progress_bar=false", "~callbacks.rich_model_summary", "~callbacks.rich_progress_bar",
            "~callbacks.model_checkpoint", f"hydra.sweep.dir={sweep}"]
    res = run_in_process("train.py", args, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    records = [json.loads((sweep / j / RECORD_NAME).read_text()) for j in ("0", "1")]
    for rec in records:
        assert tuple(rec) == RECORD_FIELDS
        assert rec["steps"] == 4 and rec["n_params"] > 0 and rec["wall_s"] > 0 and rec["cpu_s"] > 0
        # the default Hyena (2 blocks, d_model 64, order 2, 3 taps) at l_max 66: 2 x (2 x 3 x 64 + 64 x 66)
        assert rec["state_size"] == 2 * (2 * 3 * 64 + 64 * 66)
        assert (sweep / "0" / rec["config"]).is_file() and (rec["git_commit"] is None or len(rec["git_commit"]) == 40)
    accs = [r["metrics"]["test/accuracy"] for r in records]
    written = report([sweep], ["model.mixer._target_"], "test/accuracy", tmp_path / "out", curve="val/loss")
    mean, std = mean_std(accs)
    row = written["table"].read_text().splitlines()[2]
    assert row.startswith(f"| Hyena | {mean:.4g} ± {std:.2g} | 2 | 4 |")
    assert written["curves"].stat().st_size > 0


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path, monkeypatch):
    target = tmp_path / RECORD_NAME
    atomic_write_text(target, '{"old": 1}')

    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(target, '{"new": 2}')
    assert json.loads(target.read_text()) == {"old": 1}
    assert [p.name for p in tmp_path.iterdir()] == [RECORD_NAME]  # no temporary file left behind


def test_curve_edges_file_name_refusal_legend_and_log_axis(fake_multirun, tmp_path):
    from serengeti.report import _label, log_scale

    written = report([fake_multirun], ["model.mixer._target_"], "test/accuracy", tmp_path / "out", curve="val/loss")
    assert written["curves"].name == "val_loss_curves.png", "named after the curve, not --metric"
    with pytest.raises(ReportError, match=r"^--curve val/accuracy: no run's CSV log has it"):
        report([fake_multirun], [], "test/accuracy", tmp_path / "o2", curve="val/accuracy")
    assert not (tmp_path / "o2").exists(), "refused before anything is written"
    wandb_only = tmp_path / "wandb_only"
    _fake_run(wandb_only / "0", "Hyena", 10, 1, 0.5)
    (wandb_only / "0" / "wandb" / "offline-run-1").mkdir(parents=True)
    with pytest.raises(ReportError, match=r"no run has a CSV log .*logged only to wandb.*logger=\[csv,wandb\]"):
        report([wandb_only], [], "test/accuracy", tmp_path / "o3", curve="val/loss")
    assert _label(["optimizer.lr", "model.mixer._target_"], (0.0005, "serengeti.mixers.Hyena")) == \
        "optimizer.lr=5e-4, model.mixer._target_=Hyena"
    assert log_scale([1e-4, 3e-4, 1e-2]) and not log_scale([10, 20]) and not log_scale(["a", "b"])


def _lr_run(path: Path, mixer: str, d: int, lr: float, seed: int, metric: dict) -> None:
    path.mkdir(parents=True)
    cfg = {"seed": seed, "model": {"d_model": d, "mixer": {"_target_": f"serengeti.mixers.{mixer}"}}, "optimizer": {"lr": lr}}
    OmegaConf.save(OmegaConf.create(cfg), path / "config_resolved.yaml")
    record = {"metrics": metric, "steps": 100, "wall_s": 1.0, "cpu_s": 1.0, "n_params": 10}
    atomic_write_text(path / RECORD_NAME, json.dumps(record))


def test_best_of_keeps_the_best_lr_per_cell(tmp_path, capsys):
    """zoology's protocol: per (mixer, d_model), the lr with the best mean accuracy; ties to the smaller lr;
    a loss picks the minimum; a cell whose runs all failed keeps them (listed as failed)."""
    acc = {("Hyena", 32, 1e-3): [0.2, 0.4], ("Hyena", 32, 3e-3): [0.9, 0.5],   # means 0.3 vs 0.7 -> 3e-3
           ("Hyena", 64, 1e-3): [0.8], ("Hyena", 64, 3e-3): [0.8],             # tie -> 1e-3
           ("H3", 32, 1e-3): [0.6], ("H3", 32, 3e-3): [0.1]}                   # -> 1e-3
    i = 0
    for (mixer, d, lr), values in acc.items():
        for seed, a in enumerate(values, 1):
            _lr_run(tmp_path / "runs" / str(i), mixer, d, lr, seed, {"test/accuracy": a, "test/loss": 1 - a})
            i += 1
    _lr_run(tmp_path / "runs" / "f", "H3", 64, 1e-3, 1, {})
    record = json.loads((tmp_path / "runs" / "f" / RECORD_NAME).read_text())
    atomic_write_text(tmp_path / "runs" / "f" / RECORD_NAME, json.dumps({**record, "status": "failed", "reason": "diverged"}))
    by = ["model.mixer._target_", "model.d_model"]
    written = report([tmp_path / "runs"], by[:1], "test/accuracy", tmp_path / "out", x="model.d_model", best="optimizer.lr")
    table = written["table"].read_text().splitlines()
    assert table[0].startswith("| model.mixer._target_ | model.d_model | optimizer.lr (best) | test/accuracy (mean ± std) | n | failed |")
    assert [row.split(" | ")[:4] for row in table[2:6]] == [
        ["| H3", "32", "0.001", "0.6"], ["| H3", "64", "0.001", "–"], ["| Hyena", "32", "0.003", "0.7 ± 0.28"],
        ["| Hyena", "64", "0.001", "0.8"]]
    assert any("diverged" in line for line in table)
    assert written["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    losses = report([tmp_path / "runs"], by, "test/loss", tmp_path / "out2", best="optimizer.lr")["table"].read_text()
    assert "| Hyena | 32 | 0.003 | 0.3 ± 0.28 |" in losses  # min loss = max accuracy
    assert main([str(tmp_path / "runs"), "--by", "optimizer.lr", "--best-of", "optimizer.lr", "--metric",
                 "test/accuracy", "--out", str(tmp_path / "o3")]) == 2
    assert "--best-of optimizer.lr is also in --by" in capsys.readouterr().err


def test_choose_on_picks_the_lr_on_the_sweep_seed_and_keeps_every_seed(tmp_path, capsys):
    """An lr sweep on seed 1, then seeds 2-3 at the chosen lr: the later seeds (here poor) must not move the
    choice to the other lr, whose only run is seed 1; all three seeds of the chosen lr are reported."""
    runs = [("Hyena", 1e-3, 1, 0.5), ("Hyena", 3e-3, 1, 0.6), ("Hyena", 3e-3, 2, 0.2), ("Hyena", 3e-3, 3, 0.1)]
    for i, (mixer, lr, seed, a) in enumerate(runs):
        _lr_run(tmp_path / "runs" / str(i), mixer, 32, lr, seed, {"test/accuracy": a})
    by = ["model.mixer._target_", "model.d_model"]
    pooled = report([tmp_path / "runs"], by, "test/accuracy", tmp_path / "o1", best="optimizer.lr")
    assert "| Hyena | 32 | 0.001 | 0.5 | 1 |" in pooled["table"].read_text()  # mean 0.3 at 3e-3 loses to 0.5
    chosen = report([tmp_path / "runs"], by, "test/accuracy", tmp_path / "o2", best="optimizer.lr",
                    choose_on=["seed=1"])
    assert "| Hyena | 32 | 0.003 | 0.3 ± 0.26 | 3 |" in chosen["table"].read_text()
    assert main([str(tmp_path / "runs"), "--by", "model.d_model", "--choose-on", "seed=1", "--metric",
                 "test/accuracy", "--out", str(tmp_path / "o3")]) == 2
    assert "give --best-of too" in capsys.readouterr().err
    assert main([str(tmp_path / "runs"), "--by", "model.d_model", "--best-of", "optimizer.lr", "--choose-on",
                 "seed", "--metric", "test/accuracy", "--out", str(tmp_path / "o4")]) == 2
    assert "--choose-on expects KEY=VALUE, got 'seed'" in capsys.readouterr().err


def test_wide_table_has_one_column_per_x_value(fake_multirun, tmp_path, capsys):
    """--wide: rows are the other --by keys, columns the --x values; a missing cell reads '–', n is per row."""
    written = report([fake_multirun], ["model.mixer._target_"], "test/accuracy", tmp_path / "out",
                     x="dataset.vocab_size", wide=True)
    assert written["table"].read_text().splitlines() == [
        "| model.mixer._target_ | dataset.vocab_size=10 | 20 | n |",
        "| --- | ---: | ---: | ---: |",
        "| H3 | 0.625 ± 0.53 | – | 2 |",
        "| Hyena | 0.7 ± 0.2 | 0.4 | 1–3 |"]
    assert written["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main([str(fake_multirun), "--by", "model.mixer._target_", "--wide", "--metric", "test/accuracy",
                 "--out", str(tmp_path / "o2")]) == 2
    assert "--wide needs --x" in capsys.readouterr().err
