"""One row per run (what it is, how far it got, what it cost, how good it is) and the config keys that differ
between the runs; rendered for a terminal, as CSV and as JSON.

Metric values may be NaN or +-inf: they are shown as nan, inf and -inf, never ranked above a finite value, and
left out of a best value, a median or a maximum when finite values exist. Params and tags are text: one that is not
a number of the kind a column needs (a whole number of steps or ranks) is shown as absent.
"""

from __future__ import annotations

import csv
import io
import math
import statistics
from typing import Any

from largessl.compare.runs import DOWNSTREAM_SUFFIX, RunData

SILENT_AFTER_MS = 3600 * 1000  # a RUNNING run that logged nothing for this long is said to be silent
IGNORED_KEYS = {"run.name"}  # the row's name already
STATUS = {"RUNNING": "running", "FINISHED": "finished", "FAILED": "failed", "KILLED": "killed",
          "SCHEDULED": "scheduled"}


def higher_is_better(metric: str) -> bool:
    """Accuracies go up, losses go down."""
    return "loss" not in metric


def finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def last(curve: list[tuple[int, float]] | None) -> float | None:
    return curve[-1][1] if curve else None


def best(curve: list[tuple[int, float]] | None, metric: str) -> float | None:
    """The best of a history's finite values (the highest, or the lowest for a loss); when it has none, the value
    logged last (nan, inf or -inf); None for no history."""
    values = [value for _, value in curve or [] if math.isfinite(value)]
    if not values:
        return last(curve)
    return max(values) if higher_is_better(metric) else min(values)


def status(run: RunData, now_ms: int) -> str:
    """MLflow's status in words; a RUNNING run that has been silent for an hour says so (its job may be dead)."""
    word = STATUS.get(run.status, run.status.lower())
    quiet = now_ms - (run.last_ms or run.start_ms)
    if run.status == "RUNNING" and quiet > SILENT_AFTER_MS:
        word += f", silent {quiet / 3_600_000:.0f}h"
    return word


def device_hours(run: RunData, now_ms: int) -> tuple[float, str]:
    """(device-hours, how they were counted): the trainer's `gpu_hours` (every job of the run, restarts included),
    or a CPU run's `cpu_hours` (processes x wall time, counted the same way), else, for runs from before them (or
    without a finite value), world size x the MLflow run's wall time (queue time between jobs included)."""
    for metric, counted in (("gpu_hours", "jobs"), ("cpu_hours", "CPU jobs")):
        logged = [v for _, v in run.curves.get(metric, []) if math.isfinite(v)]
        if logged:
            return max(logged), counted
    world = world_size(run) or 1
    end = run.end_ms or (now_ms if run.status == "RUNNING" else run.last_ms or run.start_ms)
    return world * max(0, end - run.start_ms) / 3_600_000, "wall clock"


def throughput(run: RunData) -> float | None:
    """Median images/s over the run's progress lines after the first (which holds the start-up); finite ones only."""
    values = [v for _, v in run.curves.get("images_per_sec", []) if math.isfinite(v)]
    return statistics.median(values[1:] if len(values) > 1 else values) if values else None


def downstream_keys(runs: list[RunData], metric: str) -> list[str]:
    """Every top-1 metric any run logged (k-NN, linear, attentive, fine-tune, few-shot...), except `metric`."""
    keys = {k for run in runs for k in run.latest if k.endswith(DOWNSTREAM_SUFFIX) and k != metric}
    return sorted(keys, key=lambda k: (not k.startswith("knn"), k))


def steps_done(run: RunData) -> int:
    return max((curve[-1][0] for curve in run.curves.values() if curve), default=0)


def number(text: str | None) -> float | None:
    """A param or tag as a number (nan and inf included); None when absent or not a number."""
    try:
        return float(text) if text not in (None, "", "None") else None
    except (TypeError, ValueError):
        return None


def count(text: str | None) -> int | None:
    """A param or tag as a count (steps, ranks): a whole number from 1 to 2**63 - 1; else None."""
    value = number(text)
    if value is None or not math.isfinite(value) or not value.is_integer() or not 1 <= value < 2**63:
        return None
    return int(value)


def world_size(run: RunData) -> int | None:
    """The tag, rewritten by every job, else the param of the first job."""
    return count(run.tags.get("world_size")) or count(run.params.get("derived.world_size"))


def row(run: RunData, metric: str, extra: list[str], now_ms: int) -> dict[str, Any]:
    """The row of one run, in raw values (None where a run has no value)."""
    hours, counted = device_hours(run, now_ms)
    planned = count(run.tags.get("max_steps")) or count(run.params.get("trainer.max_steps"))  # params: the first
    values = {
        "run": run.name, "run_id": run.run_id,
        "method": run.tags.get("method") or run.params.get("objective.name", ""),
        "model": run.tags.get("model") or run.params.get("model.name", ""),
        "status": status(run, now_ms), "steps": steps_done(run), "max_steps": planned,
        "epochs": last(run.curves.get("epoch")), "world_size": world_size(run),
        f"best_{metric}": best(run.curves.get(metric), metric), f"last_{metric}": last(run.curves.get(metric)),
        "last_loss": last(run.curves.get("loss")), "images_per_sec": throughput(run), "device_hours": hours,
        "device_hours_counted": counted,
    }
    return {**values, **{key: last(run.curves.get(key)) for key in extra}}


def ordered(rows: list[dict[str, Any]], metric: str) -> list[dict[str, Any]]:
    """Best first by the metric's best value; then the runs whose best is not finite (nan, inf, -inf), then those
    without the metric, each group by name (and id)."""
    sign = -1.0 if higher_is_better(metric) else 1.0

    def key(r: dict[str, Any]) -> tuple[int, float, str, str]:
        value = r[f"best_{metric}"]
        group = 0 if finite(value) else 1 if value is not None else 2
        return group, sign * value if group == 0 else 0.0, r["run"], r["run_id"]

    return sorted(rows, key=key)


def differing(runs: list[RunData]) -> dict[str, list[str]]:
    """{config key: its value in each run, in order ('-' where a run lacks it)} for the keys whose values differ."""
    keys = sorted(set().union(*(run.params for run in runs)) - IGNORED_KEYS)
    table = {key: [run.params.get(key, "-") for run in runs] for key in keys}
    return {key: values for key, values in table.items() if len(set(values)) > 1}


# ----------------------------------------------------------------------------- rendering


def decimal(value: float, places: int) -> str:
    """`value` with `places` decimals, short whatever it is: nan, inf, -inf; 4 significant digits from 1e6 on."""
    if not math.isfinite(value):
        return str(value)
    return f"{value:.{places}f}" if abs(value) < 1e6 else f"{value:.4g}"


def cell(value: Any, column: str) -> str:
    """A value as the table shows it; '-' for none."""
    if value is None or value == "":
        return "-"
    if isinstance(value, (str, int)):
        return str(value)
    if column == "device_hours":
        return decimal(value, 3 if abs(value) < 100 else 0)
    return decimal(value, {"images_per_sec": 1, "epochs": 2}.get(column, 4))


HEADERS = {"run": "run", "method": "method", "model": "model", "status": "status", "steps": "steps",
           "epochs": "epochs", "world_size": "world", "last_loss": "loss", "images_per_sec": "img/s",
           "device_hours": "device-h"}


def shown(r: dict[str, Any], column: str) -> str:
    """A row's cell in the table: steps as done/planned, device-hours from wall clock marked '~', a CPU run's
    marked 'cpu'."""
    if column == "steps":
        return f"{r['steps']}/{r['max_steps'] or '?'}"
    text = cell(r[column], column)
    if column != "device_hours" or text == "-":
        return text
    return text + {"wall clock": "~", "CPU jobs": " cpu"}.get(r["device_hours_counted"], "")


def display(rows: list[dict[str, Any]], metric: str, extra: list[str]) -> tuple[list[str], list[list[str]]]:
    """(headers, cells) of the terminal and HTML tables."""
    columns = ["run", "method", "model", "status", "steps", "epochs", "world_size", f"best_{metric}",
               f"last_{metric}", "last_loss", "images_per_sec", "device_hours", *extra]
    headers = [HEADERS.get(c, c.replace("best_", "best ").replace("last_", "last ")) for c in columns]
    return headers, [[shown(r, c) for c in columns] for r in rows]


def aligned(headers: list[str], cells: list[list[str]], left: int = 4) -> str:
    """A plain-text table: the first `left` columns left-aligned, the others right-aligned."""
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(headers)]

    def line(values: list[str]) -> str:
        return "  ".join(v.ljust(w) if i < left else v.rjust(w) for i, (v, w) in
                         enumerate(zip(values, widths, strict=True))).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(c) for c in cells)])


def split(diff: dict[str, list[str]]) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """(keys whose values differ between the runs that have them, keys only some runs have with one value: a
    method's own settings)."""
    varied = {k: v for k, v in diff.items() if len({x for x in v if x != "-"}) > 1}
    return varied, {k: v for k, v in diff.items() if k not in varied}


def differing_text(diff: dict[str, list[str]], names: list[str]) -> str:
    """The differing keys as a table (key x run), then the keys only some runs have, grouped by those runs."""
    if len(names) < 2:
        return "one run: no config keys to compare"
    if not diff:
        return "the runs' configs are identical"
    varied, partial = split(diff)
    parts = []
    if varied:
        cells = [[key, *(v if len(v) <= 28 else v[:25] + "..." for v in values)] for key, values in varied.items()]
        parts.append(f"config keys that differ ({len(varied)}):\n" + aligned(["key", *names], cells,
                                                                              left=len(names) + 1))
    parts += only_in(partial, names)
    return "\n\n".join(parts)


def only_in(partial: dict[str, list[str]], names: list[str]) -> list[str]:
    """'only in RUNS: key=value, ...' for the keys only some runs have, one line per group of runs."""
    groups: dict[tuple[str, ...], list[str]] = {}
    for key, values in partial.items():
        owners = tuple(n for n, v in zip(names, values, strict=True) if v != "-")
        groups.setdefault(owners, []).append(f"{key}={next(v for v in values if v != '-')}")
    return [f"only in {', '.join(owners)}: " + ", ".join(items) for owners, items in groups.items()]


def csv_text(rows: list[dict[str, Any]], diff: dict[str, list[str]], order: list[str]) -> str:
    """The rows with every column, then one column per differing config key."""
    out = io.StringIO()
    columns = list(rows[0]) + list(diff)
    writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        index = order.index(r["run_id"])
        writer.writerow({**r, **{key: values[index] for key, values in diff.items()}})
    return out.getvalue()
