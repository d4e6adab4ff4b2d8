"""Hydra callback: at the end of a ``-m`` multirun, one table of every job's overrides and final metrics.

Selected in ``configs/hydra/default.yaml`` (``hydra.callbacks.sweep_summary``). When the sweep ends,
every job directory under ``hydra.sweep.dir`` (the ones holding ``.hydra/overrides.yaml``) is one
row: its command-line overrides, its status, and its final metrics from the ``metrics.json`` that
``train.py`` writes (:mod:`serengeti.io.run_record`; ``evaluate.py``'s flat one works too). A job that
failed (a non-finite loss, an error) has ``status: failed`` and its reason there, and the sweep went on
with the next job (``train.py``'s main). A job that wrote no record (the task function is not
``train.py``'s) shows the value its task function returned (``train.py``: the ``monitor`` metric)
when it ran in this process. The table is written to ``<sweep dir>/summary.csv`` (every override and
metric, status and reason) and ``summary.md`` (the overrides that differ between jobs, and the
``val/`` / ``test/`` metrics; failed jobs' reasons below it) after every job, so a long sweep can be
followed, and printed at the end; if any job failed, the process then exits non-zero.
"""
from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any, Sequence

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from serengeti.io.atomic import atomic_write_text
from serengeti.io.run_record import FAILED, RECORD_NAME, record_status
from serengeti.training.callbacks.progress import console

SHOWN_PREFIXES = ("val/", "test/")


def job_dirs(sweep_dir: Path) -> list[Path]:
    """Job directories of a sweep, in job order (numeric names numerically)."""
    dirs = [p.parent.parent for p in sweep_dir.glob("*/.hydra/overrides.yaml")]
    return sorted(dirs, key=lambda p: (0, int(p.name), "") if p.name.isdigit() else (1, 0, p.name))


def job_row(job_dir: Path, returned: dict[str, Any] | None = None) -> dict[str, Any]:
    """``{"job", "overrides", "status", "metrics", "steps"}`` of one job directory.

    ``returned``: what :meth:`SweepSummary.on_job_end` saw for this job (status, monitor, value).
    """
    overrides = [str(o) for o in OmegaConf.load(job_dir / ".hydra" / "overrides.yaml")]
    row: dict[str, Any] = {"job": job_dir.name, "overrides": overrides, "status": "no record", "metrics": {},
                           "steps": None, "reason": None}
    if returned is not None:
        row["status"] = returned["status"]
        value = returned.get("value")
        if returned.get("monitor") and isinstance(value, (int, float)) and not isinstance(value, bool):
            row["metrics"][returned["monitor"]] = float(value)
    record_path = job_dir / RECORD_NAME
    if record_path.is_file():
        try:
            record = json.loads(record_path.read_text())
        except (OSError, ValueError) as e:
            row["status"] = f"unreadable {RECORD_NAME} ({e})"
        else:
            flat = {k: v for k, v in record.items() if isinstance(v, (int, float)) and "/" in k}  # evaluate.py's
            row["metrics"].update(record.get("metrics") or flat)
            row["steps"] = record.get("steps")
            if "status" in record or returned is None:  # train.py's record knows; evaluate.py's flat one does not
                row["status"], row["reason"] = record_status(record), record.get("reason")
    return row


def varying_overrides(rows: Sequence[dict]) -> list[str]:
    """Override keys whose value differs between jobs (or that some jobs lack), in first-seen order."""
    values: dict[str, set] = {}
    for row in rows:
        for o in row["overrides"]:
            key, _, value = o.partition("=")
            values.setdefault(key, set()).add(value)
    return [k for k, v in values.items() if len(v) > 1 or any(k not in _as_dict(r) for r in rows)]


def _as_dict(row: dict) -> dict[str, str]:
    return dict(o.partition("=")[::2] for o in row["overrides"])


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        return "nan" if math.isnan(x) else f"{x:.4g}"
    return "–" if x is None else str(x)


def summary_table(rows: Sequence[dict]) -> tuple[list[str], list[list[str]]]:
    """``(header, cells)``: job, the varying overrides, status, steps, the ``val/`` and ``test/`` metrics."""
    keys = varying_overrides(rows)
    metrics = sorted({m for r in rows for m in r["metrics"] if m.startswith(SHOWN_PREFIXES)})
    header = ["job", *keys, "status", "steps", *metrics]
    cells = [[r["job"], *(_as_dict(r).get(k, "–") for k in keys), r["status"], _fmt(r["steps"]),
              *(_fmt(r["metrics"].get(m)) for m in metrics)] for r in rows]
    return header, cells


def write_summary(sweep_dir: Path, rows: Sequence[dict]) -> tuple[Path, Path]:
    """``summary.csv`` (all overrides and metrics) and ``summary.md`` (the table) in ``sweep_dir``."""
    all_metrics = sorted({m for r in rows for m in r["metrics"]})
    csv_path = sweep_dir / "summary.csv"
    fh = io.StringIO(newline="")
    writer = csv.writer(fh)
    writer.writerow(["job", "overrides", "status", "reason", "steps", *all_metrics])
    for r in rows:
        writer.writerow([r["job"], " ".join(r["overrides"]), r["status"], r.get("reason") or "",
                         r["steps"] if r["steps"] is not None else "", *(r["metrics"].get(m, "") for m in all_metrics)])
    atomic_write_text(csv_path, fh.getvalue())
    header, cells = summary_table(rows)
    md_path = sweep_dir / "summary.md"
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(c) + " |" for c in cells]
    failures = failure_lines(rows)
    if failures:
        lines += ["", *(f"- {line}" for line in failures)]
    atomic_write_text(md_path, "\n".join(lines) + "\n")
    return csv_path, md_path


def failure_lines(rows: Sequence[dict]) -> list[str]:
    """``job 0 failed: <reason>`` for each failed job."""
    return [f"job {r['job']} failed: {r.get('reason') or 'no reason recorded'}" for r in rows if r["status"] == FAILED]


def print_table(title: str, rows: Sequence[dict]) -> None:
    from rich.table import Table

    header, cells = summary_table(rows)
    table = Table(title=title)
    for h in header:
        table.add_column(h, justify="right" if "/" in h or h in ("job", "steps") else "left")
    for c in cells:
        table.add_row(*c)
    console().print(table)
    for line in failure_lines(rows):
        print(f"[serengeti] {line}")


class SweepSummary(Callback):
    """Collects each job's return value (same-process launchers) and writes the table when the sweep ends."""

    def __init__(self) -> None:
        self.returned: dict[str, dict[str, Any]] = {}

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        job_dir = Path(config.hydra.runtime.output_dir).resolve()
        ok = job_return.status == JobStatus.COMPLETED
        self.returned[str(job_dir)] = {"status": "completed" if ok else FAILED, "monitor": config.get("monitor"),
                                       "value": job_return.return_value if ok else None}
        if not ok:
            self.returned[str(job_dir)]["reason"] = str(job_return._return_value).strip().splitlines()[0][:500]
        sweep_dir = Path(config.hydra.sweep.dir)
        if sweep_dir.is_dir():  # the summary so far: a long sweep can be followed, a killed one still has it
            write_summary(sweep_dir, self._rows(sweep_dir))

    def _rows(self, sweep_dir: Path) -> list[dict]:
        rows = []
        for d in job_dirs(sweep_dir):
            returned = self.returned.get(str(d.resolve()))
            row = job_row(d, returned)
            if row["status"] == FAILED and not row.get("reason") and returned:
                row["reason"] = returned.get("reason")
            rows.append(row)
        return rows

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        rows = self._rows(sweep_dir) if sweep_dir.is_dir() else []
        if not rows:
            return
        print_table(f"sweep {sweep_dir}: {len(rows)} jobs", rows)
        csv_path, md_path = write_summary(sweep_dir, rows)
        print(f"[serengeti] sweep summary written to {csv_path} and {md_path.name}")
        failed = [r["job"] for r in rows if r["status"] == FAILED]
        if failed:  # SystemExit passes Hydra's callback guard: the sweep's exit status says it
            raise SystemExit(f"error: {len(failed)} of {len(rows)} sweep jobs failed (job {', '.join(failed)}); "
                             f"see {md_path}")
