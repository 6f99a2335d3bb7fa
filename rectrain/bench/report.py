"""Result files of a benchmark job: JSON, a Markdown table, PNG plots (matplotlib), and the
machine description every result carries."""

from __future__ import annotations

import json
import os
import platform
import time
from typing import Sequence

#: the "on a loaded machine" caveat printed with every table
LOADED_NOTE = ("Absolute figures depend on the machine's load at the time; compare paths by the "
               "ratios, which were measured in one run.")


def machine() -> dict:
    """CPU count, load average, memory, versions, GPU (if any), UTC time."""
    import numpy
    import pyarrow
    import torch

    info = {"time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "platform": platform.platform(), "python": platform.python_version(),
            "cpus": os.cpu_count(), "torch": torch.__version__, "numpy": numpy.__version__,
            "pyarrow": pyarrow.__version__, "torch_threads": torch.get_num_threads()}
    try:
        info["load_avg_1_5_15"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    try:
        with open("/proc/meminfo") as f:
            info["mem_total_gib"] = round(int(f.readline().split()[1]) / 2**20, 1)
    except OSError:
        pass
    for mod in ("torchrec", "fbgemm_gpu", "ray"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - a missing optional package is just not reported
            info[mod] = None
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpus"] = torch.cuda.device_count()
    return info


def markdown_table(rows: Sequence[dict], columns: Sequence[str], fmt: dict | None = None) -> str:
    """A GitHub Markdown table of ``rows`` (dicts) restricted to ``columns``; numbers formatted
    by ``fmt[column]`` (a format spec) or with thousands separators / 4 significant digits."""
    fmt = fmt or {}

    def cell(c, v):
        if v is None:
            return "–"
        if c in fmt and isinstance(v, (int, float)):
            return format(v, fmt[c])
        if isinstance(v, bool):
            return str(v)
        if isinstance(v, int):
            return f"{v:,}"
        if isinstance(v, float):
            return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.4g}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(cell(c, r.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def write(out_dir: str, name: str, result: dict, markdown: str) -> str:
    """Write ``<name>.json`` and ``<name>.md`` under ``out_dir``; returns the JSON path."""
    os.makedirs(out_dir, exist_ok=True)
    result = {"bench": name, "machine": machine(), **result}
    path = os.path.join(out_dir, f"{name}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1, default=float)
    with open(os.path.join(out_dir, f"{name}.md"), "w") as f:
        f.write(markdown.rstrip() + "\n")
    return path


def _pyplot():
    """``matplotlib.pyplot`` on the Agg backend (files only, no display).

    Raises:
        ImportError: matplotlib is missing; it comes with the ``bench`` extra.
    """
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError("benchmark plots need matplotlib, which comes with the bench extra: "
                          "pip install -e '.[bench]' (or bash scripts/setup.sh --test)") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_bars(path: str, labels: Sequence[str], values: Sequence[float], ylabel: str,
              title: str) -> str:
    """A bar chart (PNG) of ``values``; returns ``path``."""
    plt = _pyplot()

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 3.6))
    bars = ax.bar(range(len(values)), values, color="#4C72B0")
    ax.set_xticks(range(len(values)), labels, rotation=15, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    for b, v in zip(bars, values):
        ax.annotate(f"{v:,.0f}", (b.get_x() + b.get_width() / 2, b.get_height()),
                    ha="center", va="bottom", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_lines(path: str, series: dict[str, tuple[Sequence[float], Sequence[float]]],
               xlabel: str, ylabel: str, title: str, logx: bool = False) -> str:
    """One line per ``series[name] = (xs, ys)``; returns ``path``."""
    plt = _pyplot()

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for name, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o", label=name)
    if logx:
        ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
