"""Aggregate finished runs into a Markdown table and matplotlib figures.

    python -m serengeti.report RUN_OR_MULTIRUN_DIR... --by model.mixer._target_,dataset.vocab_size \\
        --metric test/accuracy [--x dataset.vocab_size [--wide]] [--best-of optimizer.lr] [--curve val/loss] \\
        [--ref 1.88:nanoGPT] --out DIR [--name NAME]

Every directory below the given ones that holds a ``metrics.json`` (see :mod:`serengeti.io.run_record`)
is one run. Its config is read from ``config_resolved.yaml`` beside it (the values the run used,
including those filled in from the dataset), else from Hydra's ``.hydra/config.yaml``, as plain data:
``${key}`` references to other keys are followed, nothing else is resolved (``${oc.env:...}`` stays
text). A run whose record or config cannot be read is skipped with one line naming the file. Runs are
grouped by the values of the ``--by`` keys; each group is one table row: the metric's mean ± sample
standard deviation over its runs (seeds), n, and the mean steps, parameters, wall and CPU seconds;
when runs record their recurrent state size (``state_size`` in ``metrics.json``: floats per sequence
at the training length), a ``state`` column too.
A run whose record says ``status: failed`` (diverged, crashed) is left out of those statistics but not
dropped: the table gets a ``failed`` column, and each failed run is listed below it with its reason.

Writes into ``--out``:

* ``NAME.md``: the table (with ``--wide``: one row per group of the other ``--by`` keys and one column per
  value of ``--x``, each cell the metric's mean ± std, ``–`` where no run has the metric, and an ``n``
  column: a length-extrapolation or state-size grid on one screen);
* ``NAME.png`` (with ``--x KEY``): the metric's mean (± std bars) against ``KEY``, one line per
  group of the other ``--by`` keys;
* ``CURVE_curves.png`` (with ``--curve CURVE``; ``NAME_curves.png`` when ``--name`` is given): that
  metric against the optimizer step from each run's CSV log (``csv/version_*/metrics.csv``; a run
  logged only to wandb has none: train with ``logger=[csv,wandb]``), mean over the group's runs, one
  line per group. Legends name the keys (``optimizer.lr=5e-4``), below the axes; an x axis of positive numbers
  spanning 32x or more (a learning-rate sweep, sequence lengths) is logarithmic.

``--where KEY=VALUE`` (repeatable) keeps only the runs whose config has that value at ``KEY`` (compared
as text, e.g. ``--where dataset.vocab_size=20``).

``--best-of KEY`` (e.g. ``optimizer.lr``) is zoology's protocol for a hyperparameter sweep: in each group of
the ``--by`` (and ``--x``) keys, only the runs at the value of ``KEY`` with the best mean metric are kept
(``--goal max``, the default, or ``min``; the default is ``min`` for a metric named like a loss,
perplexity or error). The table shows the chosen value in a ``KEY (best)`` column, and the plot has one
line per group of the other keys. Ties go to the smaller value; a group whose runs all failed keeps them.
``--choose-on seed=1`` chooses on the sweep's seed only and then keeps every seed at the chosen value (a
sweep on seed 1, more seeds at the chosen lr: the extra seeds never change which lr is reported).

``--ref VALUE[:LABEL]`` draws an external number (e.g. ``1.88:nanoGPT``) as a dashed line on the
metric's plots.

``--embed FILE`` also puts the table into ``FILE`` (e.g. experiments.md) between the lines
``<!-- report:NAME -->`` and ``<!-- /report:NAME -->``, replacing what was there, so that a document's
tables are regenerated from the runs and never typed by hand.
"""
from __future__ import annotations

import argparse
import csv
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from serengeti.io.atomic import atomic_write_text
from serengeti.io.run_record import (FAILED, RECORD_NAME, RESOLVED_CONFIG_NAME, RunRecordError, read_run_config,
                                  read_run_record, record_status)


class ReportError(ValueError):
    """Bad input to the report: the message names the argument or file and what was expected."""


@dataclass
class Run:
    """One finished run: its directory, config values and record."""

    path: Path
    config: Any
    record: dict

    def value(self, key: str) -> Any:
        """The config value at dotted ``key`` (``None`` when absent); a value that is exactly a
        reference ``${other.key}`` is followed (a few hops), any other interpolation is returned as text."""
        value = _lookup(self.config, key)
        for _ in range(8):
            ref = _REFERENCE.fullmatch(value) if isinstance(value, str) else None
            if ref is None:
                break
            value = _lookup(self.config, ref.group(1))
        return value

    @property
    def failed(self) -> bool:
        """The run stopped before it finished (its record's ``status`` is ``failed``)."""
        return record_status(self.record) == FAILED


_REFERENCE = re.compile(r"\$\{([A-Za-z_][\w.]*)\}")  # ${model.l_max}, not ${oc.env:X} or ${hydra:...}


def _lookup(config: Any, key: str) -> Any:
    node = config
    for part in key.split("."):
        if isinstance(node, dict):
            node = node.get(part)
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node


@dataclass
class Group:
    """Runs sharing the values of the ``--by`` keys, and the statistics of one metric over them."""

    key: tuple
    runs: list[Run] = field(default_factory=list)

    @property
    def completed(self) -> list[Run]:
        return [r for r in self.runs if not r.failed]

    @property
    def failed(self) -> list[Run]:
        return [r for r in self.runs if r.failed]

    def values(self, metric: str) -> list[float]:
        return [r.record["metrics"][metric] for r in self.completed if metric in r.record["metrics"]]

    def mean_of(self, field_name: str) -> float:
        xs = [float(r.record[field_name]) for r in self.completed if r.record.get(field_name) is not None]
        return sum(xs) / len(xs) if xs else math.nan


def mean_std(xs: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1 in the denominator; nan for n < 2)."""
    n = len(xs)
    if n == 0:
        return math.nan, math.nan
    mean = sum(xs) / n
    if n < 2:
        return mean, math.nan
    return mean, math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))


def find_runs(roots: Sequence[str | Path], skipped: list[str] | None = None) -> list[Run]:
    """Every run (a directory holding ``metrics.json``) under ``roots``, sorted by path.

    A run whose record or config cannot be read is left out; the reason (naming the file) is
    appended to ``skipped`` when given.
    """
    runs = []
    for root in roots:
        root = Path(root)
        if not root.is_dir():
            raise ReportError(f"run directory not found: {root}")
        for record_path in sorted(root.rglob(RECORD_NAME)):
            run_dir = record_path.parent
            config_path = run_dir / RESOLVED_CONFIG_NAME
            if not config_path.is_file():
                config_path = run_dir / ".hydra" / "config.yaml"
            try:
                if not config_path.is_file():
                    raise RunRecordError(f"{run_dir}: no {RESOLVED_CONFIG_NAME} or .hydra/config.yaml beside {RECORD_NAME}")
                runs.append(Run(run_dir, read_run_config(config_path), read_run_record(run_dir)))
            except RunRecordError as e:
                if skipped is not None:
                    skipped.append(str(e))
    if not runs:
        raise ReportError(f"no readable {RECORD_NAME} found under {', '.join(map(str, roots))}"
                          + (f" ({len(skipped)} skipped: {skipped[0]})" if skipped else ""))
    return runs


def select_runs(runs: Sequence[Run], where: Sequence[str]) -> list[Run]:
    """The runs whose config value at each ``KEY`` of the ``KEY=VALUE`` filters ``where`` reads ``VALUE``."""
    kept = [r for r in runs if matches(r, where, "--where")]
    if runs and not kept:
        raise ReportError(f"--where {' '.join(where)}: no run matches")
    return kept


def matches(run: Run, conditions: Sequence[str], option: str) -> bool:
    """Whether ``run``'s config reads ``VALUE`` at ``KEY`` for every ``KEY=VALUE`` of ``conditions``
    (compared as text); ``option`` names the command-line option in the error for a malformed condition."""
    for condition in conditions:
        key, sep, value = condition.partition("=")
        if not sep or not key:
            raise ReportError(f"{option} expects KEY=VALUE, got {condition!r}")
        if str(run.value(key)) != value:
            return False
    return True


def best_of(runs: Sequence[Run], by: Sequence[str], key: str, metric: str, goal: str = "max",
            choose_on: Sequence[str] = ()) -> list[Run]:
    """For each group of the ``by`` keys, the runs at the value of ``key`` whose mean ``metric`` over its
    completed runs is the best (``goal``: ``max`` or ``min``; ties go to the first value in sorted order).
    With ``choose_on`` (``KEY=VALUE`` filters, e.g. ``seed=1``: the sweep's seed), the value is chosen on the
    runs that match them only, and every run of the group at that value is kept (the other seeds included).
    A group in which no run to choose on has the metric (all failed) is kept whole, so that its failures
    are reported."""
    if goal not in ("max", "min"):
        raise ReportError(f"--goal expects max or min, got {goal!r}")
    pick = max if goal == "max" else min
    kept: list[Run] = []
    for group in group_runs(runs, by):
        sweep = [r for r in group.runs if matches(r, choose_on, "--choose-on")]
        options = [o for o in group_runs(sweep, [key]) if o.values(metric)]
        if not options:
            kept += group.runs
            continue
        chosen = pick(options, key=lambda o: mean_std(o.values(metric))[0]).key
        kept += [r for r in group.runs if (r.value(key),) == chosen]
    return kept


def default_goal(metric: str) -> str:
    """``min`` for a metric named like a loss, perplexity or error rate, else ``max``."""
    return "min" if re.search(r"loss|perplexity|ppl|err|bpb|bpc", metric, re.IGNORECASE) else "max"


def group_runs(runs: Sequence[Run], by: Sequence[str]) -> list[Group]:
    """Groups in order of their key values (numbers numerically, the rest as text)."""
    groups: dict[tuple, Group] = {}
    for run in runs:
        key = tuple(run.value(k) for k in by)
        groups.setdefault(key, Group(key)).runs.append(run)
    return [groups[k] for k in sorted(groups, key=_sort_key)]


def _sort_key(key: tuple) -> tuple:
    return tuple((0, v, "") if isinstance(v, (int, float)) else (1, 0, str(v)) for v in key)


def show(key: str, value: Any) -> str:
    """A config value for a table cell or legend (a ``_target_`` shows its class name only)."""
    if key.endswith("_target_") and isinstance(value, str):
        return value.rsplit(".", 1)[-1]
    return "–" if value is None else str(value)


def _fmt(x: float, digits: int = 4) -> str:
    """``digits`` significant digits; whole numbers (steps, parameter counts) in full."""
    if x is None or math.isnan(x):
        return "–"
    return str(int(x)) if float(x).is_integer() else f"{x:.{digits}g}"


def markdown_table(groups: Sequence[Group], by: Sequence[str], metric: str, best: str | None = None) -> str:
    """One row per group: the ``by`` values, metric mean ± std, n, mean steps / params (/ state) / wall / CPU s
    over the completed runs; ``state`` when any run records a ``state_size``; when any run failed, a ``failed``
    column and one line per failed run below the table. ``best`` names the last ``by`` key as the one
    chosen by :func:`best_of` (its header reads ``KEY (best)``)."""
    any_failed = any(g.failed for g in groups)
    any_state = any(r.record.get("state_size") is not None for g in groups for r in g.completed)
    head = [*(f"{k} (best)" if k == best else k for k in by), f"{metric} (mean ± std)", "n", *(["failed"] if any_failed else []), "steps", "params",
            *(["state"] if any_state else []), "wall s", "CPU s"]
    numeric = 6 + int(any_failed) + int(any_state)
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join([" --- "] * len(by) + [" ---: "] * numeric) + "|"]
    for g in groups:
        row = [show(k, v) for k, v in zip(by, g.key)]
        row += [mean_std_cell(g.values(metric)), str(len(g.values(metric))), *([str(len(g.failed))] if any_failed else []),
                _fmt(g.mean_of("steps"), 6), _fmt(g.mean_of("n_params"), 6),
                *([_fmt(g.mean_of("state_size"), 6)] if any_state else []), _fmt(g.mean_of("wall_s"), 4),
                _fmt(g.mean_of("cpu_s"), 4)]
        lines.append("| " + " | ".join(row) + " |")
    failed = [r for g in groups for r in g.failed]
    return "\n".join(lines + failed_lines(failed)) + "\n"


def mean_std_cell(values: Sequence[float]) -> str:
    """A table cell: ``mean ± std`` (std to 2 digits), the mean alone for one value, ``–`` for none."""
    mean, std = mean_std(values)
    return _fmt(mean) if math.isnan(std) else f"{_fmt(mean)} ± {_fmt(std, 2)}"


def failed_lines(failed: Sequence[Run]) -> list[str]:
    """The lines below a table for its failed runs: a blank line, then each run with its reason."""
    return ["", *(f"- failed: {r.path} (after {r.record.get('steps')} steps): {r.record.get('reason') or 'no reason recorded'}"
                  for r in failed)] if failed else []


def wide_table(runs: Sequence[Run], rest: Sequence[str], x: str, metric: str) -> str:
    """One row per group of the ``rest`` keys, one column per value of ``x`` (in order); each cell the
    metric's mean ± std over that cell's completed runs, ``–`` where none has the metric; an ``n`` column
    (the runs per cell: one number, or the range); failed runs listed below the table as in
    :func:`markdown_table`."""
    columns = [g.key[0] for g in group_runs(runs, [x])]
    head = [*rest, *(f"{x}={show(x, c)}" if i == 0 else show(x, c) for i, c in enumerate(columns)), "n"]  # x=64 | 128 | …
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join([" --- "] * len(rest) + [" ---: "] * (len(columns) + 1)) + "|"]
    failed: list[Run] = []
    for row in group_runs(runs, rest):
        cells = {c.key[0]: c for c in group_runs(row.runs, [x])}
        values = [cells[c].values(metric) if c in cells else [] for c in columns]
        texts = [mean_std_cell(v) for v in values]
        counts = [len(v) for v in values if v]
        n = "–" if not counts else str(min(counts)) if min(counts) == max(counts) else f"{min(counts)}–{max(counts)}"
        lines.append("| " + " | ".join([*(show(k, v) for k, v in zip(rest, row.key)), *texts, n]) + " |")
        failed += [r for c in cells.values() for r in c.failed]
    return "\n".join(lines + failed_lines(failed)) + "\n"


def read_curve(run_dir: Path, metric: str) -> dict[int, float]:
    """``{step: value}`` of ``metric`` from the run's CSV logs (later versions override earlier).

    The step is the number of optimizer steps done when the value was logged: Lightning's CSV rows
    from training and validation count from 0 (the value after 10 steps has ``step`` 9), so they get
    1 added; test rows already carry the step count.
    """
    points: dict[int, float] = {}
    shift = 0 if metric.startswith("test/") else 1
    for path in sorted((run_dir / "csv").glob("version_*/metrics.csv")):
        with open(path, newline="") as fh:
            for row in csv.DictReader(fh):
                if row.get(metric) not in (None, "") and row.get("step") not in (None, ""):
                    points[int(float(row["step"])) + shift] = float(row[metric])
    return points


def check_curve(runs: Sequence[Run], metric: str) -> None:
    """Refuse ``--curve METRIC`` in one line when no run has it in a CSV log (an empty plot otherwise)."""
    if any(read_curve(r.path, metric) for r in runs if not r.failed):
        return
    with_csv = [r for r in runs if any((r.path / "csv").glob("version_*/metrics.csv"))]
    if with_csv:
        raise ReportError(f"--curve {metric}: no run's CSV log has it (csv/version_*/metrics.csv under "
                          f"{with_csv[0].path})")
    wandb_only = any((r.path / "wandb").is_dir() for r in runs)
    raise ReportError(f"--curve {metric}: no run has a CSV log (csv/version_*/metrics.csv)"
                      + ("; these runs logged only to wandb, whose files the report does not read: train with "
                         "logger=[csv,wandb]" if wandb_only else "; train with logger=csv (the default) or logger=[csv,wandb]"))


def mean_curve(runs: Sequence[Run], metric: str) -> tuple[list[int], list[float]]:
    """Steps logged by every run, and the metric's mean over the runs at each of them."""
    curves = [read_curve(r.path, metric) for r in runs if not r.failed]
    curves = [c for c in curves if c]
    if not curves:
        return [], []
    steps = sorted(set.intersection(*(set(c) for c in curves)))
    return steps, [sum(c[s] for c in curves) / len(curves) for s in steps]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _label(by: Sequence[str], key: tuple) -> str:
    """A legend entry: ``optimizer.lr=5e-4, model.n_layer=2`` (keys named, numbers short)."""
    return ", ".join(f"{k}={_short(v) if isinstance(v, float) else show(k, v)}" for k, v in zip(by, key)) or "all runs"


def _short(x: float) -> str:
    """``0.0005`` -> ``5e-4``, ``0.25`` -> ``0.25``, ``1e6`` -> ``1e6``."""
    if x != 0 and (abs(x) < 1e-2 or abs(x) >= 1e5):
        mantissa, exponent = f"{x:.3g}".split("e") if "e" in f"{x:.3g}" else (f"{x:.3g}", "0")
        if exponent == "0":
            mantissa, exponent = f"{x:.2e}".split("e")
            mantissa = mantissa.rstrip("0").rstrip(".")
        return f"{mantissa}e{int(exponent)}"
    return f"{x:.4g}"


def log_scale(values: Sequence[Any]) -> bool:
    """Whether an axis of these x values reads better logarithmic: positive numbers spanning 32x or more
    (a learning-rate sweep, sequence lengths 64 to 4096)."""
    nums = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return len(nums) == len(values) > 1 and min(nums) > 0 and max(nums) / min(nums) >= 32


def plot_metric(runs: Sequence[Run], rest: Sequence[str], metric: str, x: str, out: Path,
                ref: tuple[float, str] | None = None) -> None:
    """Metric mean ± std against config key ``x``, one line per group of the ``rest`` keys."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for g in group_runs(runs, rest):
        points = group_runs(g.runs, [x])
        xs = [p.key[0] for p in points]
        stats = [mean_std(p.values(metric)) for p in points]
        numeric = all(isinstance(v, (int, float)) for v in xs)
        counts = sorted({len(p.values(metric)) for p in points})
        n = str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
        ax.errorbar(xs if numeric else range(len(xs)), [m for m, _ in stats],
                    yerr=[0.0 if math.isnan(s) else s for _, s in stats], marker="o", capsize=3,
                    label=f"{_label(rest, g.key)} (n={n})")
        if not numeric:
            ax.set_xticks(range(len(xs)), [show(x, v) for v in xs], rotation=25, ha="right", fontsize=8)
    xs_all = [p.key[0] for p in group_runs(runs, [x])]
    if log_scale(xs_all):  # lengths and widths (integers) in powers of 2, learning rates in powers of 10
        ax.set_xscale("log", base=2 if all(isinstance(v, int) for v in xs_all) else 10)
    ax.set_xlabel(x)
    _finish(fig, ax, metric, ref, out)


def plot_curves(groups: Sequence[Group], by: Sequence[str], metric: str, out: Path,
                ref: tuple[float, str] | None = None) -> None:
    """``metric`` against the step (mean over each group's runs), one line per group."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for g in groups:
        steps, values = mean_curve(g.runs, metric)
        if steps:
            ax.plot(steps, values, marker=".", label=f"{_label(by, g.key)} (n={len(g.runs)})")
    ax.set_xlabel("step")
    _finish(fig, ax, metric, ref, out)


def _finish(fig, ax, metric: str, ref: tuple[float, str] | None, out: Path) -> None:
    """Axis label, optional reference line (value, label), grid, legend; save and close."""
    if ref is not None:
        ax.axhline(ref[0], color="gray", linestyle="--", linewidth=1, label=ref[1])
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(0.0, -0.16))  # below the axes: never over a line
    fig.savefig(out, dpi=120, bbox_inches="tight")
    _pyplot().close(fig)


def report(roots: Sequence[str | Path], by: Sequence[str], metric: str, out: str | Path, *, x: str | None = None,
           curve: str | None = None, name: str | None = None, ref: tuple[float, str] | None = None,
           where: Sequence[str] = (), skipped: list[str] | None = None, best: str | None = None,
           goal: str | None = None, choose_on: Sequence[str] = (), wide: bool = False) -> dict[str, Path]:
    """Write the table (and figures) for the runs under ``roots`` that pass the ``where`` filters
    (:func:`select_runs`), keeping per group only the best value of ``best`` when given, chosen on the runs
    that match ``choose_on`` (:func:`best_of`); ``wide`` writes the table with one column per value of ``x``
    (:func:`wide_table`);
    returns ``{kind: path}``. Unreadable runs are skipped (:func:`find_runs`)."""
    runs = select_runs(find_runs(roots, skipped), where)
    if not any(metric in r.record["metrics"] for r in runs):
        known = sorted({m for r in runs for m in r.record["metrics"]})
        raise ReportError(f"--metric {metric!r} is in no run's metrics.json (they have: {', '.join(known)})")
    if wide and (x is None or best is not None):
        raise ReportError("--wide needs --x (its values become the columns) and no --best-of (one value per cell)")
    if x is not None and x not in by:
        by = [*by, x]
    if best is not None:
        if best in by:
            raise ReportError(f"--best-of {best} is also in --by/--x: it is chosen per group, not grouped by")
        runs = best_of(runs, by, best, metric, goal or default_goal(metric), choose_on)
    elif choose_on:
        raise ReportError("--choose-on chooses the value of --best-of KEY: give --best-of too")
    if curve is not None:
        check_curve(runs, curve)  # before anything is written
    table_by = [*by, best] if best else list(by)  # the chosen value shows in its own column
    groups = group_runs(runs, table_by)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    explicit_name = name is not None
    name = name or metric.replace("/", "_")
    written = {"table": out / f"{name}.md"}
    rest = [k for k in by if k != x]
    written["table"].write_text(wide_table(runs, rest, x, metric) if wide else markdown_table(groups, table_by, metric, best))
    if x is not None:
        written["plot"] = out / f"{name}.png"
        plot_metric(runs, rest, metric, x, written["plot"], ref)
    if curve is not None:
        written["curves"] = out / f"{name if explicit_name else curve.replace('/', '_')}_curves.png"
        plot_curves(groups, by, curve, written["curves"], ref if curve == metric else None)
    return written


def embed_table(document: str | Path, name: str, table: str) -> None:
    """Replace the lines between ``<!-- report:NAME -->`` and ``<!-- /report:NAME -->`` of ``document`` with
    ``table`` (written atomically). Raises :class:`ReportError` when the file or the marker pair is missing."""
    path = Path(document)
    try:
        text = path.read_text()
    except OSError as e:
        raise ReportError(f"--embed {path}: cannot read it ({e.strerror or e})") from None
    begin, end = f"<!-- report:{name} -->", f"<!-- /report:{name} -->"
    pattern = re.compile(re.escape(begin) + r"\n.*?" + re.escape(end), re.DOTALL)
    if len(pattern.findall(text)) != 1:
        raise ReportError(f"--embed {path}: expected one block from the line '{begin}' to the line '{end}' "
                          f"(--name sets NAME)")
    atomic_write_text(path, pattern.sub(lambda _: f"{begin}\n{table}{end}", text))


def parse_ref(text: str | None) -> tuple[float, str] | None:
    """``"1.88:nanoGPT"`` -> ``(1.88, "nanoGPT")``; a bare number gets the label ``reference``."""
    if text is None:
        return None
    value, _, label = text.partition(":")
    try:
        return float(value), label or "reference"
    except ValueError:
        raise ReportError(f"--ref expects VALUE[:LABEL] with a number, got {text!r}") from None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serengeti.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("dirs", nargs="+", help="run or multirun directories (searched for metrics.json)")
    parser.add_argument("--by", default="", help="comma-separated config keys to group by")
    parser.add_argument("--metric", required=True, help="metric of metrics.json, e.g. test/accuracy or val/loss")
    parser.add_argument("--x", default=None, help="config key for the x axis of the metric plot")
    parser.add_argument("--curve", default=None, help="CSV-logged metric to plot against the step, e.g. val/loss")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--name", default=None, help="file stem of the outputs (default: the metric)")
    parser.add_argument("--ref", default=None, help="VALUE[:LABEL]: a dashed reference line for the metric, e.g. 1.88:nanoGPT")
    parser.add_argument("--where", action="append", default=[], metavar="KEY=VALUE",
                        help="keep only runs whose config has VALUE at KEY (repeatable), e.g. dataset.vocab_size=20")
    parser.add_argument("--best-of", default=None, metavar="KEY",
                        help="per group, keep only the value of KEY with the best mean metric, e.g. optimizer.lr")
    parser.add_argument("--goal", default=None, choices=["max", "min"],
                        help="with --best-of: the best is the max (default) or min (default for losses)")
    parser.add_argument("--choose-on", action="append", default=[], metavar="KEY=VALUE",
                        help="with --best-of: choose on the runs with VALUE at KEY only (repeatable), e.g. seed=1 "
                             "for an lr sweep on seed 1 followed by more seeds at the chosen lr")
    parser.add_argument("--wide", action="store_true",
                        help="table with one column per value of --x (each cell: mean ± std) instead of one row per value")
    parser.add_argument("--embed", default=None, metavar="FILE",
                        help="also write the table into FILE between '<!-- report:NAME -->' and '<!-- /report:NAME -->'")
    args = parser.parse_args(argv)
    by = [k for k in args.by.split(",") if k]
    skipped: list[str] = []
    try:
        written = report(args.dirs, by, args.metric, args.out, x=args.x, curve=args.curve, name=args.name,
                         ref=parse_ref(args.ref), where=args.where, skipped=skipped, best=args.best_of,
                         goal=args.goal, choose_on=args.choose_on, wide=args.wide)
        for reason in skipped:
            print(f"report: skipped {reason}", file=sys.stderr)
        if skipped:
            print(f"report: {len(skipped)} run(s) skipped", file=sys.stderr)
        if args.embed:
            embed_table(args.embed, written["table"].stem, written["table"].read_text())
    except ReportError as e:
        print(f"report: {e}", file=sys.stderr)
        return 2
    sys.stdout.write(written["table"].read_text())
    for kind, path in written.items():
        print(f"wrote {kind}: {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
