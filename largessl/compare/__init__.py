"""`largessl compare`: the runs of an MLflow experiment side by side, as a table, the config keys that differ
between them, and a picture of their curves (PNG, or an HTML page with the tables too).

Runs come from the store they logged to: --tracking-uri, else $MLFLOW_TRACKING_URI, else MLflow's default
(sqlite:///mlflow.db in the working directory), SQLite or a server.

A metric that is NaN or +-inf is nan, inf or -inf everywhere: in the table, in the CSV (which Python's float and
most CSV readers read back) and in the JSON, as those strings (JSON has no such numbers).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from largessl.errors import UserError

PLOT_SUFFIXES = (".png", ".html")


def add_parser(commands: argparse._SubParsersAction) -> None:
    from largessl.commandline import HelpFormatter

    compare = commands.add_parser(
        "compare", help="compare the runs of an MLflow experiment", formatter_class=HelpFormatter,
        description=(
            "A table of an experiment's runs (best first by --metric), the config keys whose values differ between\n"
            "them, and with --plot their loss and metric curves. Requeued or resumed runs appear once, with their\n"
            "whole history; device-hours are world size x wall time summed over a run's jobs (GPU-hours, or a\n"
            "CPU run's process-hours, marked cpu)."),
        epilog="example: largessl compare --experiment largessl-debug --plot compare.png")
    compare.add_argument("--experiment", required=True, metavar="NAME", help="MLflow experiment (tracking.experiment)")
    compare.add_argument("--filter", metavar="MLFLOW_FILTER",
                         help="MLflow search filter, e.g. \"params.objective.name = 'mae' and metrics.knn_top1 > 0.3\"")
    compare.add_argument("--runs", nargs="+", metavar="ID_OR_NAME", help="only these runs (id or name)")
    compare.add_argument("--metric", default="knn_top1", metavar="NAME",
                         help="metric to rank by (higher is better unless its name contains 'loss')")
    compare.add_argument("--plot", type=Path, metavar="FILE", help="write the curves: FILE.png, or FILE.html (a page "
                         "with the picture and the tables)")
    compare.add_argument("--csv", type=Path, metavar="FILE", help="write the table (every column, raw values) as CSV")
    compare.add_argument("--json", action="store_true", help="print the comparison as JSON instead of the table")
    compare.add_argument("--tracking-uri", default="", metavar="URI",
                         help="MLflow store (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here)")


def store_uri(given: str) -> str:
    """--tracking-uri, else $MLFLOW_TRACKING_URI, else MLflow's default: as the trainer chooses (tracking.uri)."""
    from largessl.config.schema import TrackingConfig
    from largessl.tracking.store import resolve_uri

    return resolve_uri(TrackingConfig(uri=given))


def check_outputs(args: argparse.Namespace) -> None:
    """Refuse, before reading the store, outputs that cannot be written."""
    if args.plot and args.plot.suffix.lower() not in PLOT_SUFFIXES:
        raise UserError(f"--plot {args.plot}: the file must end in .png or .html")
    for option, path in (("--plot", args.plot), ("--csv", args.csv)):
        if path and not path.resolve().parent.is_dir():
            raise UserError(f"{option} {path}: directory {path.resolve().parent} does not exist")


def run(args: argparse.Namespace) -> int:
    from largessl.compare import runs as source
    from largessl.compare import table

    check_outputs(args)
    uri = store_uri(args.tracking_uri)
    found = source.fetch(uri, args.experiment, args.filter or "", args.runs or [], args.metric)
    now = source.now_ms()
    extra = table.downstream_keys(found, args.metric)
    rows = table.ordered([table.row(r, args.metric, extra, now) for r in found], args.metric)
    found = [next(r for r in found if r.run_id == row["run_id"]) for row in rows]  # in table order
    diff = table.differing(found)
    names = [r.name for r in found]
    report = {"experiment": args.experiment, "store": uri, "metric": args.metric, "rows": rows, "diff": diff}
    if args.csv:
        write(args.csv, table.csv_text(rows, diff, [r.run_id for r in found]))
    if args.plot:
        write_plot(args.plot, found, report, extra)
    if args.json:
        print(json.dumps(as_json(report, found), indent=1, allow_nan=False))
        return 0
    direction = "higher" if table.higher_is_better(args.metric) else "lower"
    print(f"experiment {args.experiment} in {uri}: {len(rows)} run(s), best {args.metric} first ({direction} is "
          f"better)\n")
    print(table.aligned(*table.display(rows, args.metric, extra)))
    print("\n" + table.differing_text(diff, names))
    for option, path in (("plot", args.plot), ("csv", args.csv)):
        if path:
            print(f"{option}: {path}")
    return 0


def write(path: Path, data: str | bytes) -> None:
    from largessl.files import write_atomic

    try:
        write_atomic(path, data)
    except OSError as exc:
        raise UserError(f"cannot write {path} ({exc.strerror or exc})") from None


def write_plot(path: Path, found: list[Any], report: dict[str, Any], extra: list[str]) -> None:
    from largessl.compare import plot, table

    labels = [f"{r['run']} ({r['method']}, {r['model']})" for r in report["rows"]]
    title = f"{report['experiment']}: {len(found)} run(s)"
    picture = plot.png_bytes(plot.figure(found, labels, report["metric"], title))
    if path.suffix.lower() == ".png":
        return write(path, picture)
    names = [r.name for r in found]
    varied, partial = table.split(report["diff"])
    page = plot.html_page(title, picture, table.display(report["rows"], report["metric"], extra),
                          (["key", *names], [[key, *values] for key, values in varied.items()]),
                          table.only_in(partial, names), report["store"])
    write(path, page)


def as_json(report: dict[str, Any], found: list[Any]) -> dict[str, Any]:
    """The report with each run's curves ([step, value] pairs) beside its row; nan, inf and -inf as strings."""
    rows = [{**row, "curves": {k: [list(p) for p in v] for k, v in run.curves.items()}}
            for row, run in zip(report["rows"], found, strict=True)]
    return spelled({**report, "rows": rows})  # diff: {config key: its value in each row, in row order}


def spelled(value: Any) -> Any:
    """`value` (dicts, lists, numbers, text) with every non-finite number as its word: 'nan', 'inf', '-inf'."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {key: spelled(item) for key, item in value.items()}
    return [spelled(item) for item in value] if isinstance(value, (list, tuple)) else value
