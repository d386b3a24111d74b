"""PNG plots of an op result: bandwidth against tensor size per implementation with the measured copy
bandwidth, and speed-up bars of this package's fastest backend. Both show one (p, activation)
setting: p = 0.1 with ReLU where measured (the common training setting), else the first present."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402

from bench.cases import PASSES  # noqa: E402
from bench.implementations import AGAIN  # noqa: E402
from bench.report import summary_rows  # noqa: E402

SPEEDUP_PASS = "forward+backward"


def shown_setting(result: dict) -> tuple[float, str]:
    """The (p, activation) the plots show."""
    present = {(row["p"], row["activation"]) for row in result["rows"]}
    return (0.1, "relu") if (0.1, "relu") in present else min(present)


def _dtypes(result: dict) -> list[str]:
    return list(dict.fromkeys(t["dtype"] for t in result["tensors"]))


def _save(figure, result: dict, p: float, activation: str, path: Path) -> Path:
    """Titles ``figure`` with the device, setting and date, writes it to ``path`` and closes it."""
    figure.suptitle(f"{result['device']}, p={p}, {activation}; {result['date'][:10]}", fontsize=11)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_bandwidth(result: dict, path: Path) -> Path:
    """GB/s (minimal bytes) against tensor MiB, one line per implementation, a subplot per dtype and
    measured pass, the copy bandwidth dashed."""
    p, activation = shown_setting(result)
    dtypes = _dtypes(result)
    passes = [name for name in PASSES if any(row["pass"] == name for row in result["rows"])]
    figure, axes = plt.subplots(len(dtypes), len(passes), figsize=(5 * len(passes), 3.6 * len(dtypes)),
                                squeeze=False, sharex=True)
    for i, dtype in enumerate(dtypes):
        copies = sorted((t["tensor_mib"], t["copy_gbps"]) for t in result["tensors"] if t["dtype"] == dtype)
        for j, pass_name in enumerate(passes):
            ax = axes[i][j]
            ax.plot(*zip(*copies), "k--", label="copy_ (floor)")
            rows = [row for row in result["rows"] if row["dtype"] == dtype and row["pass"] == pass_name
                    and row["p"] == p and row["activation"] == activation and not row["implementation"].endswith(AGAIN)]
            for name in dict.fromkeys(row["implementation"] for row in rows):
                points = sorted((row["tensor_mib"], row["gbps"]) for row in rows if row["implementation"] == name)
                ax.plot(*zip(*points), "o-", label=name, markersize=4)
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())  # 100, not 10^2
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.set_title(f"{pass_name}, {dtype}", fontsize=10)
            ax.set_xlabel("tensor MiB")
            ax.set_ylabel("GB/s (minimal bytes)")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    return _save(figure, result, p, activation, path)


def plot_speedups(result: dict, path: Path) -> Path:
    """Forward+backward speed-up of this package's fastest backend against each baseline, a bar
    group per tensor, a subplot per dtype; 1x marked."""
    p, activation = shown_setting(result)
    dtypes = _dtypes(result)
    figure, axes = plt.subplots(1, len(dtypes), figsize=(6 * len(dtypes), 4), squeeze=False)
    baselines = {"vs_eager": "vs eager timm", "vs_torchvision": "vs torchvision", "vs_compile": "vs torch.compile"}
    for ax, dtype in zip(axes[0], dtypes):
        lines = [line for line in summary_rows(result) if line["dtype"] == dtype and line["pass"] == SPEEDUP_PASS
                 and line["p"] == p and line["activation"] == activation]
        width = 0.8 / len(baselines)
        for k, (key, label) in enumerate(baselines.items()):
            ax.bar([i + k * width for i in range(len(lines))], [line[key] or 0 for line in lines], width, label=label)
        ax.axhline(1.0, color="k", linewidth=0.8)
        ax.set_xticks([i + width * (len(baselines) - 1) / 2 for i in range(len(lines))])
        ax.set_xticklabels([line["label"] for line in lines], rotation=30, ha="right", fontsize=8)
        ax.set_ylabel(f"{SPEEDUP_PASS} speed-up")
        ax.set_title(dtype, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    return _save(figure, result, p, activation, path)
