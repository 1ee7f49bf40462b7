"""Reporting for `longtrain eval`: text tables, the passkey heat map and perplexity-by-position
plots, for one model or several side by side (`longtrain bench extend`)."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import numpy as np


def fmt_length(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_passkey(res: dict[str, Any], path: Path, title: str) -> None:
    """Heat map: x context length (tokens), y needle depth, colour accuracy (%)."""
    plt = _pyplot()
    acc = np.asarray(res["accuracy"]).T  # [depth, length]
    width = max(4.8, 1.6 + 1.1 * len(res["lengths"]))  # wide enough for the title with one length
    fig, ax = plt.subplots(figsize=(width, 1.8 + 0.55 * len(res["depths"])), dpi=110)
    im = ax.imshow(acc, vmin=0, vmax=100, cmap="RdYlGn", aspect="auto", origin="upper")
    ax.set_xticks(range(len(res["lengths"])), [fmt_length(L) for L in res["lengths"]])
    ax.set_yticks(range(len(res["depths"])), [f"{d:g}" for d in res["depths"]])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("passkey depth (fraction of context)")
    for y in range(acc.shape[0]):
        for x in range(acc.shape[1]):
            ax.text(x, y, "n/a" if np.isnan(acc[y, x]) else f"{acc[y, x]:.0f}", ha="center", va="center", fontsize=9,
                    color="black")
    cb = fig.colorbar(im, ax=ax)
    cb.set_label("accuracy (%)")
    wrapped = "\n".join(textwrap.wrap(title, width=int(width * 9)))
    ax.set_title(f"{wrapped}\n({res['samples']} samples per cell)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_ppl(res: dict[str, Any], path: Path, title: str) -> None:
    """Line plot: x token position (tokens, bucket centre), y perplexity; one line per context length."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    for L, bks, n in zip(res["lengths"], res["buckets"], res["windows"]):
        xs = [(b["start"] + b["end"]) / 2 for b in bks]
        ax.plot(xs, [b["ppl"] for b in bks], marker="o", label=f"context {fmt_length(L)} ({n} docs)")
    ax.set_xlabel("token position (tokens)")
    ax.set_ylabel("perplexity")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def passkey_table(res: dict[str, Any]) -> str:
    head = "depth \\ length | " + " | ".join(f"{fmt_length(L):>6}" for L in res["lengths"])
    lines = [head, "-" * len(head)]
    acc = np.asarray(res["accuracy"])
    for di, d in enumerate(res["depths"]):
        lines.append(f"{d:>14g} | " + " | ".join(f"{acc[li, di]:>5.1f}%" for li in range(len(res["lengths"]))))
    lines.append(f"{'all depths':>14} | " + " | ".join(f"{acc[li].mean():>5.1f}%" for li in range(len(res["lengths"]))))
    return "\n".join(lines)


def ppl_table(res: dict[str, Any]) -> str:
    lines = ["length | docs | ppl      | ppl by position bucket (start-end: ppl)", "-" * 72]
    for L, p, n, bks in zip(res["lengths"], res["ppl"], res["windows"], res["buckets"]):
        bk = "  ".join(f"{b['start']}-{b['end']}: {b['ppl']:.3g}" for b in bks)
        lines.append(f"{fmt_length(L):>6} | {n:>4} | {p:<8.4g} | {bk}")
    return "\n".join(lines)


# ---- several models side by side (longtrain bench extend) ---------------------------------------

def plot_passkey_compare(results: dict[str, dict[str, Any]], path: Path, title: str = "") -> None:
    """One heat map per model, side by side on a shared colour scale: x context length (tokens), y needle
    depth (fraction of context), colour and label accuracy (%)."""
    plt = _pyplot()
    names = list(results)
    first = results[names[0]]
    n_len, n_dep = len(first["lengths"]), len(first["depths"])
    w = 0.55 * n_len + 0.9
    fig, axes = plt.subplots(1, len(names), figsize=(w * len(names) + 1.6, 1.9 + 0.45 * n_dep), dpi=110,
                             squeeze=False, sharey=True)
    im = None
    for ax, name in zip(axes[0], names):
        res = results[name]
        acc = np.asarray(res["accuracy"]).T  # [depth, length]
        im = ax.imshow(acc, vmin=0, vmax=100, cmap="RdYlGn", aspect="auto", origin="upper")
        ax.set_xticks(range(len(res["lengths"])), [fmt_length(L) for L in res["lengths"]], fontsize=8)
        ax.set_yticks(range(len(res["depths"])), [f"{d:g}" for d in res["depths"]], fontsize=8)
        for y in range(acc.shape[0]):
            for x in range(acc.shape[1]):
                ax.text(x, y, f"{acc[y, x]:.0f}", ha="center", va="center", fontsize=7, color="black")
        ax.set_title("\n".join(textwrap.wrap(name, 18)), fontsize=8)
        ax.set_xlabel("context length (tokens)", fontsize=8)
    axes[0][0].set_ylabel("passkey depth (fraction of context)", fontsize=8)
    cb = fig.colorbar(im, ax=list(axes[0]), fraction=0.02, pad=0.01)
    cb.set_label("accuracy (%)", fontsize=8)
    samples = first.get("samples")
    lines = max(len(textwrap.wrap(n, 18)) for n in names)
    fig.suptitle(f"{title} ({samples} samples per cell)" if title else f"Passkey accuracy ({samples} samples per cell)",
                 fontsize=9, y=1.0 + 0.05 * lines)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)


def plot_ppl_compare(results: dict[str, dict[str, Any]], path: Path, length: int, title: str = "") -> None:
    """Perplexity (y, log scale) against token position (x, tokens; bucket centres) at one context
    length, one line per model (held-out documents, the same for every model)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    for name, res in results.items():
        if length not in res["lengths"]:
            continue
        i = res["lengths"].index(length)
        bks = res["buckets"][i]
        ax.plot([(b["start"] + b["end"]) / 2 for b in bks], [b["ppl"] for b in bks], marker="o",
                label=f"{name} ({res['windows'][i]} docs)")
    ax.set_yscale("log")
    ax.set_xlabel("token position (tokens)")
    ax.set_ylabel("perplexity (log scale)")
    ax.grid(True, alpha=0.3, which="both")
    ax.legend(fontsize=7)
    ax.set_title(title or f"Held-out perplexity by position, context {fmt_length(length)}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def ppl_between(res: dict[str, Any], length: int, start: int, end: int) -> float:
    """Perplexity over token positions [start, end) at context `length`, from equal-size buckets that
    tile that range exactly (exp of the mean of the buckets' log perplexities)."""
    i = res["lengths"].index(length)
    inside = [b for b in res["buckets"][i] if b["start"] >= start and b["end"] <= end]
    if not inside or inside[0]["start"] != start or inside[-1]["end"] != end:
        raise ValueError(f"buckets of length {length} do not tile positions {start}-{end}")
    sizes = np.array([b["end"] - b["start"] for b in inside], dtype=float)
    logs = np.log([b["ppl"] for b in inside])
    return float(np.exp((sizes * logs).sum() / sizes.sum()))


# ---- RULER -----------------------------------------------------------------------------------

def ruler_table(res: dict[str, Any]) -> str:
    """Text table: one row per task, one column per context length, scores 0..100, then the average."""
    lengths = res["lengths"]
    head = f"{'task':>16} | " + " | ".join(f"{fmt_length(L):>6}" for L in lengths)
    lines = [head, "-" * len(head)]
    for task, by_len in res["scores"].items():
        lines.append(f"{task:>16} | " + " | ".join(_cell(by_len[L]) for L in lengths))
    lines.append(f"{'average':>16} | " + " | ".join(_cell(res['average'][L]) for L in lengths))
    if res.get("skipped"):
        lines.append("n/a: the length cannot hold the task (see 'skipped' in ruler.json)")
    return "\n".join(lines)


def _cell(v: float | None) -> str:
    return f"{'n/a':>6}" if v is None else f"{v:>6.1f}"


def plot_ruler(res: dict[str, Any], path: Path, title: str) -> None:
    """Heat map: x context length (tokens), y task, colour score (0..100)."""
    plt = _pyplot()
    tasks, lengths = list(res["scores"]), res["lengths"]
    acc = np.array([[np.nan if res["scores"][t][L] is None else res["scores"][t][L] for L in lengths] for t in tasks],
                   dtype=float)
    width = max(5.2, 2.6 + 1.1 * len(lengths))
    fig, ax = plt.subplots(figsize=(width, 1.6 + 0.45 * len(tasks)), dpi=110)
    im = ax.imshow(acc, vmin=0, vmax=100, cmap="RdYlGn", aspect="auto", origin="upper")
    ax.set_xticks(range(len(lengths)), [fmt_length(L) for L in lengths])
    ax.set_yticks(range(len(tasks)), tasks)
    ax.set_xlabel("context length (tokens)")
    for y in range(acc.shape[0]):
        for x in range(acc.shape[1]):
            ax.text(x, y, "n/a" if np.isnan(acc[y, x]) else f"{acc[y, x]:.0f}", ha="center", va="center", fontsize=9,
                    color="black")
    fig.colorbar(im, ax=ax).set_label("score (0..100)")
    wrapped = "\n".join(textwrap.wrap(title, width=int(width * 9)))
    ax.set_title(f"{wrapped}\n({res['samples_per_cell']} samples per cell)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
