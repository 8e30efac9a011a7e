"""The comparison picture: loss against step, loss against GPU-hours and the chosen metric against step, one
colour per run (best run first), and the self-contained HTML page that holds it with the tables.

A value that is NaN or +-inf is a gap in its line: it takes no part in the axes' range, the log-scale decision or
the smoothing.
"""

from __future__ import annotations

import base64
import html
import io
import math
import time
from typing import Any

from largessl.compare.runs import RunData

SMOOTH_ABOVE = 60  # loss curves with more points than this get an EMA line over the faint raw one
LOG_RATIO = 5.0  # loss axes go logarithmic when the largest loss is this many times the smallest


def gaps(values: list[float]) -> list[float]:
    """`values` with nan for each one that is not finite: matplotlib leaves a gap there."""
    return [value if math.isfinite(value) else math.nan for value in values]


def smoothed(values: list[float], weight: float = 0.9) -> list[float]:
    """An exponential moving average with bias correction (TensorBoard's smoothing) of the finite values; nan (a
    gap) at the others, which leave the average as it was."""
    out, average, count = [], 0.0, 0
    for value in values:
        if not math.isfinite(value):
            out.append(math.nan)
            continue
        count += 1
        average = weight * average + (1 - weight) * value
        out.append(average / (1 - weight**count))
    return out


def joined(x: list[tuple[int, float]], y: list[tuple[int, float]]) -> tuple[list[float], list[float]]:
    """(x values, y values) at the steps both curves have; nan where either is not finite."""
    at = dict(x)
    pairs = [(at[step], value) for step, value in y if step in at]
    return gaps([p[0] for p in pairs]), gaps([p[1] for p in pairs])


def draw_loss(ax: Any, xs: list[float], ys: list[float], colour: Any) -> Any:
    """One run's loss; a smoothed line over the faint raw curve when it is long. Returns the line for the legend."""
    ys = gaps(ys)
    if len(ys) > SMOOTH_ABOVE:
        ax.plot(xs, ys, color=colour, alpha=0.25, linewidth=0.8)
        return ax.plot(xs, smoothed(ys), color=colour, linewidth=2.0)[0]
    return ax.plot(xs, ys, color=colour, linewidth=2.0, marker="o" if len(ys) < 12 else None, markersize=3)[0]


def style(ax: Any, title: str, xlabel: str, ylabel: str) -> None:
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    ax.set_title(title, fontsize=13, loc="left")
    ax.set_xlabel(xlabel, fontsize=11)
    ax.set_ylabel(ylabel, fontsize=11)
    ax.grid(True, alpha=0.3)
    ax.spines[["top", "right"]].set_visible(False)
    ax.tick_params(labelsize=10)
    if xlabel == "step":
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if ax.get_yscale() == "log":  # plain numbers (0.9, 2, 8), not 8 x 10^0
        for axis_formatter in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
            axis_formatter(FuncFormatter(lambda value, _: f"{value:g}"))


def empty(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=11, color="0.45")


def figure(runs: list[RunData], labels: list[str], metric: str, title: str) -> Any:
    """The three panels for `runs` (in the order the table lists them), with one legend below them."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    fig = Figure(figsize=(16, 5.2), dpi=100, layout="constrained")
    loss_ax, cost_ax, metric_ax = fig.subplots(1, 3)
    colours = colormaps["tab10"].colors
    handles, losses = [], []
    for index, run in enumerate(runs):
        colour = colours[index % len(colours)]
        loss = run.curves.get("loss", [])
        losses += [v for _, v in loss if 0 < v < math.inf]  # positive and finite
        line = draw_loss(loss_ax, [s for s, _ in loss], [v for _, v in loss], colour)
        hours, values = joined(run.curves.get("gpu_hours") or run.curves.get("cpu_hours", []), loss)
        if values:
            draw_loss(cost_ax, hours, values, colour)
        if run.curves.get(metric):
            steps, values = zip(*run.curves[metric], strict=True)
            metric_ax.plot(steps, gaps(list(values)), color=colour, linewidth=2.0, marker="o", markersize=4)
        handles.append(line)
    if losses and max(losses) > LOG_RATIO * min(losses):
        loss_ax.set_yscale("log")
        cost_ax.set_yscale("log")
    style(loss_ax, "training loss", "step", "loss")
    style(cost_ax, "training loss against cost", "device-hours (world size x wall time; CPU runs: processes)", "loss")
    style(metric_ax, metric, "step", metric)
    if not any(run.curves.get("gpu_hours") or run.curves.get("cpu_hours") for run in runs):
        empty(cost_ax, "no run logged gpu_hours or cpu_hours")
    if not any(math.isfinite(v) for run in runs for _, v in run.curves.get(metric, [])):
        empty(metric_ax, f"no run logged a finite {metric}" if any(r.curves.get(metric) for r in runs) else
              f"no run logged {metric}")
    fig.suptitle(title, fontsize=15, x=0.01, ha="left")
    fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 4), fontsize=11, frameon=False)
    return fig


def png_bytes(fig: Any) -> bytes:
    out = io.BytesIO()
    fig.savefig(out, format="png", dpi=120, facecolor="white")
    return out.getvalue()


def html_table(headers: list[str], cells: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in cells)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


PAGE_STYLE = ("body{font-family:system-ui,sans-serif;margin:2em;color:#222}table{border-collapse:collapse;"
              "margin:1em 0}th,td{padding:4px 10px;border-bottom:1px solid #ddd;text-align:right;"
              "font-variant-numeric:tabular-nums}th{background:#f4f4f4}td:nth-child(-n+4),th:nth-child(-n+4)"
              "{text-align:left}img{max-width:100%}.note{color:#666}")


def html_page(title: str, picture: bytes, table: tuple[list[str], list[list[str]]],
              diff: tuple[list[str], list[list[str]]], only: list[str], store: str) -> str:
    """One self-contained page: the picture (inline PNG), the runs table, the config keys whose values differ and
    the lines naming keys only some runs have."""
    image = base64.b64encode(picture).decode()
    diff_part = html_table(*diff) if diff[1] else "<p class='note'>No config key differs between the runs.</p>"
    diff_part += "".join(f"<p class='note'>{html.escape(line)}</p>" for line in only)
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{PAGE_STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
            f"<p class='note'>MLflow store {html.escape(store)}; made by largessl compare at "
            f"{time.strftime('%Y-%m-%d %H:%M %Z')}</p><img alt='loss and metric curves' "
            f"src='data:image/png;base64,{image}'><h2>Runs</h2>{html_table(*table)}<h2>Config keys that differ</h2>"
            f"{diff_part}</body></html>\n")
