"""The sweep summary (serengeti.sweep_summary): a -m multirun ends with a table of overrides and metrics."""
from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT
from serengeti.sweep_summary import job_dirs, job_row, summary_table, varying_overrides, write_summary


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


def test_multirun_prints_and_writes_the_summary(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), HYDRA_FULL_ERROR="0", OMP_NUM_THREADS="1")
    sweep = tmp_path / "sweep"
    res = subprocess.run([sys.executable, str(ROOT / "train.py"), "-m", "seed=1,2", "debug=fdr", "logger=none",
                          "dataset.num_examples=32", "dataset.num_test_examples=8", "dataset.batch_size=8",
                          "trainer.enable_progress_bar=false", "~callbacks.rich_model_summary",
                          f"hydra.sweep.dir={sweep}"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    printed = [float(v) for v in re.findall(r"\[serengeti\] .*?val/loss=([0-9.]+)", res.stdout)]
    assert len(printed) == 2, res.stdout[-2000:]
    rows = list(csv.DictReader(open(sweep / "summary.csv")))
    assert [(r["job"], r["overrides"].split()[0], r["status"]) for r in rows] == [("0", "seed=1", "completed"),
                                                                                  ("1", "seed=2", "completed")]
    assert [float(r["val/loss"]) for r in rows] == pytest.approx(printed, rel=1e-3), "the loss each job printed"
    assert "sweep summary written to" in res.stdout and (sweep / "summary.md").is_file()
    assert re.search(r"job\s+┃\s+seed", res.stdout), "the printed table has the varying override as a column"
