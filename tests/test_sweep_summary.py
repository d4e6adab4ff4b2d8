"""The sweep summary (serengeti.training.sweep_summary): a -m multirun ends with a table of overrides and metrics."""
from __future__ import annotations

import csv
import json
import re
import sys

import pytest

from entry_runs import run_in_process
from serengeti.training.sweep_summary import job_dirs, job_row, summary_table, varying_overrides, write_summary


def _job(sweep, name, overrides, metrics=None, steps=None):
    d = sweep / name
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    if metrics is not None:
        (d / "metrics.json").write_text(json.dumps({"metrics": metrics, "steps": steps}))
    return d


def test_rows_from_records_and_return_values(tmp_path):
    _job(tmp_path, "10", ["optimizer.lr=1e-3", "seed=2", "debug=fdr"], {"val/loss": 1.5, "train/loss": 2.0}, 4)
    _job(tmp_path, "2", ["optimizer.lr=1e-3", "seed=1", "debug=fdr"], {"val/loss": 1.25, "test/accuracy": 0.5}, 4)
    failed = _job(tmp_path, "3", ["optimizer.lr=5e-4", "seed=1", "debug=fdr"])
    (tmp_path / "multirun.yaml").write_text("not a job\n")
    dirs = job_dirs(tmp_path)
    assert [d.name for d in dirs] == ["2", "3", "10"], "job order, numerically"
    rows = [job_row(d, {"status": "failed", "monitor": "val/loss", "value": None} if d == failed else None) for d in dirs]
    assert rows[1]["status"] == "failed" and rows[1]["metrics"] == {}
    assert varying_overrides(rows) == ["optimizer.lr", "seed"]
    header, cells = summary_table(rows)
    assert header == ["job", "optimizer.lr", "seed", "status", "steps", "test/accuracy", "val/loss"]
    assert cells[0] == ["2", "1e-3", "1", "completed", "4", "0.5", "1.25"]
    assert cells[1] == ["3", "5e-4", "1", "failed", "–", "–", "–"]
    csv_path, md_path = write_summary(tmp_path, rows)
    table = list(csv.DictReader(open(csv_path)))
    assert [r["job"] for r in table] == ["2", "3", "10"]
    assert table[2]["overrides"] == "optimizer.lr=1e-3 seed=2 debug=fdr" and float(table[2]["train/loss"]) == 2.0
    assert md_path.read_text().splitlines()[0] == "| " + " | ".join(header) + " |"


def test_return_value_fills_in_without_a_record(tmp_path):
    d = _job(tmp_path, "0", ["seed=1"])
    row = job_row(d, {"status": "completed", "monitor": "val/accuracy", "value": 0.75})
    assert row["metrics"] == {"val/accuracy": 0.75} and row["status"] == "completed"


def test_evaluate_py_flat_metrics_json(tmp_path):
    d = _job(tmp_path, "0", ["split=test"])
    (d / "metrics.json").write_text(json.dumps({"ckpt": "x.ckpt", "split": "test", "test/loss": 2.5, "wall_s": 1.0}))
    assert job_row(d)["metrics"] == {"test/loss": 2.5}


def test_multirun_survives_a_failed_job_and_exits_non_zero(tmp_path):
    """A diverging job is recorded as failed, the next job runs, the summary shows both, the exit status is 1."""
    sweep = tmp_path / "sweep"
    res = run_in_process("train.py", ["-m", "optimizer.lr=1e6,1e-3", "trainer.max_steps=6", "threads=1", "logger=none",
                                      "dataset.num_examples=32", "dataset.num_test_examples=8", "dataset.batch_size=8",
                                      "trainer.enable_progress_bar=false", "~callbacks.rich_model_summary",
                                      f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    assert res.returncode == 1, res.stderr[-3000:]
    assert res.stderr.strip().splitlines()[-1] == f"error: 1 of 2 sweep jobs failed (job 0); see {sweep / 'summary.md'}"
    record = json.loads((sweep / "0" / "metrics.json").read_text())
    assert record["status"] == "failed" and "non-finite loss" in record["reason"] and record["steps"] < 6
    assert json.loads((sweep / "1" / "metrics.json").read_text())["status"] == "completed"
    printed = [float(v) for v in re.findall(r"\[serengeti\] .*?val/loss=([0-9.]+)", res.stdout)]
    assert len(printed) == 1, res.stdout[-2000:]
    rows = list(csv.DictReader(open(sweep / "summary.csv")))
    assert [(r["job"], r["overrides"].split()[0], r["status"]) for r in rows] == [
        ("0", "optimizer.lr=1000000.0", "failed"), ("1", "optimizer.lr=0.001", "completed")]
    assert "non-finite loss" in rows[0]["reason"] and rows[1]["reason"] == ""
    assert [float(rows[1]["val/loss"])] == pytest.approx(printed, rel=1e-3), "the loss the job printed"
    assert "sweep summary written to" in res.stdout
    assert "- job 0 failed: error: non-finite loss" in (sweep / "summary.md").read_text()
    assert re.search(r"job\s+┃\s+optimizer.lr", res.stdout), "the printed table has the varying override as a column"
    from serengeti.report import find_runs, group_runs, markdown_table

    table = markdown_table(group_runs(find_runs([sweep]), ["optimizer.lr"]), ["optimizer.lr"], "val/loss")
    assert "| 1000000.0 | – | 0 | 1 |" in table and f"- failed: {sweep / '0'} (after " in table, table


def test_failed_status_in_the_record_wins_over_the_return_value(tmp_path):
    d = _job(tmp_path, "0", ["optimizer.lr=1e6"], {"train/loss": float("nan")}, 2)
    record = json.loads((d / "metrics.json").read_text())
    (d / "metrics.json").write_text(json.dumps({**record, "status": "failed", "reason": "error: non-finite loss"}))
    row = job_row(d, {"status": "completed", "monitor": "val/loss", "value": None})
    assert (row["status"], row["reason"], row["steps"]) == ("failed", "error: non-finite loss", 2)


def test_printed_table_is_not_cut_at_80_columns_in_a_log(tmp_path, capsys, monkeypatch):
    from serengeti.training.sweep_summary import print_table

    monkeypatch.setattr(sys.stdout, "isatty", lambda: False, raising=False)
    long = "model.mixer.some_rather_long_option_name=" + "x" * 60
    rows = [job_row(_job(tmp_path, str(i), [f"{long}{i}"], {"val/loss": 1.0 + i}, 4)) for i in range(2)]
    print_table("sweep", rows)
    out = capsys.readouterr().out
    assert f"{'x' * 60}1" in out and max(map(len, out.splitlines())) > 100
