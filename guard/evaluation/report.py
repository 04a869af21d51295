"""The HTML report of a `guard eval` run (``--report DIR``): the numbers as tables, and plots made
with matplotlib: precision, recall, stop and false-interrupt rates against the swept value, and
a histogram of where interrupts land relative to ``unsafe_start``. A directory a policy author
opens in a browser or attaches to a review: ``index.html`` plus its PNGs, nothing fetched."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ValueError("--report needs matplotlib: pip install 'qwen3guard-sidecar[report]'") from None
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _number(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    return html.escape(str(value))


def _metrics_table(title: str, m: dict) -> str:
    rows = []
    for stage in ("prompt", "response"):
        for mode in ("strict", "loose"):
            b = m[stage][mode]
            rows.append(f"<tr><td>{stage}</td><td>{mode}</td><td>{b['n']}</td><td>{_number(b['precision'])}</td>"
                        f"<td>{_number(b['recall'])}</td><td>{_number(b['f1'])}</td></tr>")  # fmt: skip
    rates = []
    for key, value in (
        ("prompts blocked", m["prompt"].get("blocked")),
        ("stop rate (Unsafe responses interrupted)", m["response"].get("stop_rate")),
        ("false-interrupt rate (Safe responses interrupted)", m["response"].get("false_interrupt_rate")),
    ):
        rates.append(f"<tr><td>{html.escape(key)}</td><td>{_number(value)}</td></tr>")
    timeliness = m.get("timeliness")
    if timeliness is not None:
        past = timeliness["released_past_unsafe_start"]
        for key, value in (("Unsafe responses with unsafe_start", timeliness["n"]),
                           ("interrupted at the first unsafe sentence", timeliness["at_first_sentence"]),
                           ("interrupted within 128 tokens", timeliness["within_128_tokens"]),
                           ("tokens released past unsafe_start (mean)", past["mean"]),
                           ("tokens released past unsafe_start (max)", past["max"]),
                           ("ms per token", m.get("ms_per_token"))):  # fmt: skip
            rates.append(f"<tr><td>{html.escape(key)}</td><td>{_number(value)}</td></tr>")
    return (f"<h2>{html.escape(title)}</h2><table><tr><th>stage</th><th>mode</th><th>n</th><th>precision</th>"
            f"<th>recall</th><th>F1</th></tr>{''.join(rows)}</table><table>{''.join(rates)}</table>")  # fmt: skip


def _sweep_plot(plt, sweep: list[dict], path: Path) -> None:
    values = [row["value"] for row in sweep]
    series = {
        "response precision (strict)": [row["metrics"]["response"]["strict"]["precision"] for row in sweep],
        "response recall (strict)": [row["metrics"]["response"]["strict"]["recall"] for row in sweep],
        "stop rate": [row["metrics"]["response"]["stop_rate"] for row in sweep],
        "false-interrupt rate": [row["metrics"]["response"]["false_interrupt_rate"] for row in sweep],
    }
    figure, axes = plt.subplots(figsize=(7, 4))
    for label, ys in series.items():
        points = [(x, y) for x, y in zip(values, ys, strict=True) if y is not None]
        if points:
            axes.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    axes.set_xlabel(sweep[0]["param"])
    axes.set_ylim(-0.02, 1.02)
    axes.grid(alpha=0.3)
    axes.legend(loc="best", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _offsets_plot(plt, runs: dict[str, list[int]], path: Path) -> None:
    figure, axes = plt.subplots(figsize=(7, 4))
    every = [o for offsets in runs.values() for o in offsets]
    bins = range(min([*every, 0]) - 1, max([*every, 0]) + 2)
    for label, offsets in runs.items():
        axes.hist(offsets, bins=bins, alpha=0.6, label=f"{label} ({len(offsets)} interrupts)")
    axes.axvline(0, color="black", linewidth=1)
    axes.set_xlabel("interrupt token - unsafe_start token")
    axes.set_ylabel("responses")
    axes.legend(loc="best", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_report(out: dict[str, Any], directory: Path) -> Path:
    """``index.html`` (and its PNGs) for ``guard eval``'s JSON object; returns the page's path."""
    plt = _pyplot()
    directory.mkdir(parents=True, exist_ok=True)
    parts = [f"<h1>guard eval: {html.escape(out['domain'])}</h1>",
             f"<p>model {html.escape(out['model']['path'])}{' (DEMO)' if out['model']['demo'] else ''}; "
             f"data {html.escape(out['data'])}; {out['current']['metrics']['examples']} examples, "
             f"{len(out['skipped'])} skipped</p>"]  # fmt: skip
    current = out["current"]
    parts.append(_metrics_table(f"current policy {current['policy']['version']}", current["metrics"]))
    offsets = {"current": current["metrics"]["timeliness"]["interrupt_offsets"]}
    if out.get("candidate"):
        candidate = out["candidate"]
        parts.append(_metrics_table(f"candidate policy {candidate['policy']['version']}", candidate["metrics"]))
        offsets["candidate"] = candidate["metrics"]["timeliness"]["interrupt_offsets"]
        rows = "".join(
            f"<tr><td>{html.escape(c['id'])}</td><td>{c['line']}</td><td>{_number(c['prompt_label'])}/"
            f"{_number(c['response_label'])}</td><td>{' &rarr; '.join(map(_number, c['prompt_action']))}</td>"
            f"<td>{' &rarr; '.join(map(_number, c['response_action']))}</td>"
            f"<td>{' &rarr; '.join(map(_number, c['interrupt_index']))}</td></tr>"
            for c in out["changes"]
        )  # fmt: skip
        header = "<tr><th>id</th><th>line</th><th>labels</th><th>prompt</th><th>response</th><th>interrupt at</th></tr>"
        parts.append(f"<h2>{len(out['changes'])} example(s) change</h2><table>{header}{rows}</table>")
    if out.get("judge"):
        parts.append(_metrics_table(f"Generative judge {out['judge']['backend']}", out["judge"]["metrics"]))
    if out.get("sweep"):
        _sweep_plot(plt, out["sweep"], directory / "sweep.png")
        parts.append(f"<h2>sweep of {html.escape(out['sweep'][0]['param'])}</h2><img src='sweep.png' alt='sweep'>")
    if any(offsets.values()):
        _offsets_plot(plt, offsets, directory / "offsets.png")
        parts.append("<h2>where interrupts land</h2><img src='offsets.png' alt='interrupt offsets'>")
    style = ("body{font-family:sans-serif;margin:2em;max-width:60em}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:.2em .6em;text-align:left}")  # fmt: skip
    page = directory / "index.html"
    page.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>guard eval</title><style>{style}"
                    f"</style></head><body>{''.join(parts)}</body></html>", encoding="utf-8")  # fmt: skip
    return page
