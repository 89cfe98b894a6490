"""PNG plots of one run; each carries the command that made it and the machine in its footer."""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _figure(results: dict[str, Any], ncols: int, title: str) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(5.5 * ncols, 4.2), squeeze=False)
    m = results["machine"]
    mode = " [quick mode: not measurements]" if results["mode"] == "quick" else ""
    fig.suptitle(title + mode)
    footer = (
        f"{results['command']} | {m['cpu_model']}, {m['usable_cpus']} cores, {m['torch_threads']} threads, "
        f"torch {m['torch']} | {results['started_utc']}"
    )
    fig.text(0.01, 0.005, textwrap.fill(footer, width=95 * ncols), fontsize=6.5, color="gray", va="bottom")
    return fig, axes[0]


def _save(fig: Any, path: Path) -> str:
    import matplotlib.pyplot as plt

    fig.tight_layout(rect=(0, 0.06, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def _plot(
    results: dict[str, Any],
    key: str,
    title: str,
    path: Path,
    draw: Callable[[Any, Any], None],
    *,
    over: str = "models",
    skip_empty: bool = False,
) -> str | None:
    """One panel per item of the list `over` (models, or training pairs) of section `key`, each drawn by
    `draw(axes, item)` and given a legend, saved to `path`; None when the section did not run (or, with
    `skip_empty`, its list is empty)."""
    s = results["sections"].get(key, {})
    if s.get("status") != "ok" or (skip_empty and not s[over]):
        return None
    fig, axes = _figure(results, len(s[over]), title)
    for ax, item in zip(axes, s[over], strict=True):
        draw(ax, item)
        ax.legend()
    return _save(fig, path)


def _draw_teacher(ax: Any, m: dict[str, Any]) -> None:
    keeps = [100 * r["keep"] for r in m["rows"]]
    ax.plot(keeps, [r["flop_speedup"] for r in m["rows"]], "k--", label="FLOP ratio")
    ax.plot(keeps, [r["inprocess_speedup"] for r in m["rows"]], "o-", label="in-process")
    ax.plot(keeps, [r["grpc_speedup"] for r in m["rows"]], "s-", label="gRPC server")
    ax.set(title=m["model"], xlabel="patches kept (%)", ylabel="speedup (x)")
    ax.invert_xaxis()
    ax.grid(alpha=0.3)


def plot_teacher(results: dict[str, Any], out: Path) -> str | None:
    title = "Teacher throughput speedup over the full teacher"
    return _plot(results, "teacher", title, out / "bench_teacher_speedup.png", _draw_teacher)


def _draw_wire(ax: Any, m: dict[str, Any]) -> None:
    keeps = [100 * r["keep"] for r in m["rows"]]
    ax.plot(keeps, [r["bytes_per_image"] for r in m["rows"]], "o-", label="InferRequest / image")
    ax.plot(keeps, [r["kept_uint8_bytes"] for r in m["rows"]], "k--", label="kept pixels as uint8")
    ax.axhline(m["float32_image_bytes"], color="r", ls=":", label="full float32 image")
    ax.set(title=m["model"], xlabel="patches kept (%)", ylabel="bytes", yscale="log")
    ax.invert_xaxis()
    ax.grid(alpha=0.3)


def plot_wire(results: dict[str, Any], out: Path) -> str | None:
    return _plot(results, "wire", "Bytes on the wire per image", out / "bench_wire.png", _draw_wire)


def _draw_microbatch(ax: Any, m: dict[str, Any]) -> None:
    clients = [r["clients"] for r in m["rows"]]
    ax.plot(
        clients,
        [r["images_per_s"] for r in m["rows"]],
        "o-",
        label=f"N clients x batch {m['rows'][0]['batch_per_client']}",
    )
    ref = m["reference"]
    ax.axhline(ref["images_per_s"], color="k", ls="--", label=f"1 client x batch {ref['batch_per_client']}")
    ax.axhline(0.9 * ref["images_per_s"], color="gray", ls=":", label="90% of reference")
    ax.set(
        title=m["model"],
        xlabel="concurrent clients",
        ylabel="images / s",
        xscale="log",
        xticks=clients,
        xticklabels=[str(c) for c in clients],
    )
    ax.grid(alpha=0.3)


def plot_microbatch(results: dict[str, Any], out: Path) -> str | None:
    title = "Micro-batching: concurrent clients"
    return _plot(results, "microbatch", title, out / "bench_microbatch.png", _draw_microbatch, skip_empty=True)


def _draw_training(ax: Any, p: dict[str, Any]) -> None:
    names = list(p["modes"])
    x = range(len(names))
    ax.bar([i - 0.2 for i in x], [p["modes"][n]["speedup_vs_full_kd"] for n in names], 0.4, label="measured")
    ax.bar(
        [i + 0.2 for i in x], [p["modes"][n]["predicted_speedup_vs_full_kd"] for n in names], 0.4, label="FLOP model"
    )
    ax.set(title=p["pair"], ylabel="speedup vs full KD (x)", xticks=list(x), xticklabels=names)
    ax.tick_params(axis="x", labelrotation=30)
    ax.grid(alpha=0.3, axis="y")


def plot_training(results: dict[str, Any], out: Path) -> str | None:
    title = "Training step speedup over full KD"
    path = out / "bench_training.png"
    return _plot(results, "training", title, path, _draw_training, over="pairs", skip_empty=True)


def write_plots(results: dict[str, Any], out: Path) -> list[str]:
    """Every plot whose section ran; returns the paths written (none when matplotlib is missing)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("benchmarks: matplotlib not installed (pip install -e '.[bench]'): no plots")
        return []
    made = [plot(results, out) for plot in (plot_teacher, plot_wire, plot_microbatch, plot_training)]
    return [p for p in made if p]
