"""PNG figures of runs: the accuracy–speedup trade-off (with the paper's points and baselines),
the Pareto front of the methods in MACs and measured wall-clock, singular-value spectra,
per-layer ranks and MACs, and the energy ladder.

Each function takes plain data and returns PNG bytes; the caller decides where they go.
Figures are drawn on an Agg canvas of their own (no pyplot, no global backend switch) at a
fixed size in pixels, so a figure's size depends only on its data.
"""

from __future__ import annotations

import io
import math

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import NullFormatter

DPI = 100
TRADEOFF_PX = (880, 600)
SPECTRA_COLS = 6
LADDER_PX = (800, 500)
REG_COLOURS = {"hoyer": "tab:blue", "l1": "tab:orange", "none": "tab:green", "filters": "tab:red"}
DEC_MARKERS = {"channel": "o", "spatial": "s", "filters": "D"}
METHOD_COLOURS = {"lowrank": "tab:blue", "channels": "tab:red", "channels+lowrank": "tab:purple"}
PARETO_PANEL_PX = (420, 420)
BASELINE_MARKERS = ("^", "v", "<", ">", "P", "X", "*", "D", "h", "p")


def spectra_px(layers: int) -> tuple[int, int]:
    cols = min(SPECTRA_COLS, max(1, layers))
    return 200 * cols, 150 * math.ceil(max(1, layers) / cols) + 60


def bars_px(layers: int) -> tuple[int, int]:
    return 900, 16 * max(1, layers) + 150


def _figure(px: tuple[int, int]) -> Figure:
    # half a pixel more: Agg truncates width·dpi to an int, and n/100·100 can land just below n
    return Figure(figsize=((px[0] + 0.5) / DPI, (px[1] + 0.5) / DPI), dpi=DPI)


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    FigureCanvasAgg(fig).print_png(buf)
    return buf.getvalue()


# -- the trade-off -----------------------------------------------------------------------------
def tradeoff_png(title: str, runs: list[dict], paper: list[dict] = (), baselines: list[dict] = (), ylabel: str = "accuracy gain (points)",
                 note: str = "") -> bytes:
    """Accuracy gain against speedup.

    ``runs``: {label, decomposition, regularizer, gain, macs_speedup, wall_speedup (or None), wall_label}.
    ``paper``: {decomposition, regularizer, gain, speedup} (drawn faint). ``baselines``: {family, gain, speedup}.
    """
    fig = _figure(TRADEOFF_PX)
    ax = fig.add_axes((0.08, 0.1, 0.6, 0.8))
    ax.axhline(0.0, color="0.6", lw=0.8, zorder=0)
    ax.axvline(1.0, color="0.6", lw=0.8, ls="--", zorder=0)  # below 1×: slower than the dense model
    for p in paper:
        ax.scatter(p["speedup"], p["gain"], marker=DEC_MARKERS.get(p["decomposition"], "o"), s=30,
                   color=REG_COLOURS.get(p["regularizer"], "0.5"), alpha=0.3, lw=0, zorder=1)
    families = list(dict.fromkeys(b["family"] for b in baselines))
    for b in baselines:
        marker = BASELINE_MARKERS[families.index(b["family"]) % len(BASELINE_MARKERS)]
        ax.scatter(b["speedup"], b["gain"], marker=marker, s=40, color="0.35", alpha=0.8, lw=0, zorder=2)
    wall_seen = False
    for r in runs:
        colour = REG_COLOURS.get(r["regularizer"], "0.2")
        marker = DEC_MARKERS.get(r["decomposition"], "o")
        ax.scatter(r["macs_speedup"], r["gain"], marker=marker, s=70, color=colour, edgecolors="black", lw=0.8, zorder=4)
        if r.get("wall_speedup"):
            wall_seen = True
            ax.plot([r["macs_speedup"], r["wall_speedup"]], [r["gain"], r["gain"]], ls=":", color=colour, lw=1, zorder=3)
            ax.scatter(r["wall_speedup"], r["gain"], marker=marker, s=70, facecolors="white", edgecolors=colour, lw=1.5, zorder=4)
        if len(runs) <= 12 and r.get("label"):
            ax.annotate(r["label"], (r["macs_speedup"], r["gain"]), xytext=(5, 4), textcoords="offset points", fontsize=7)
    ax.set_xlabel("speedup (×)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=11)
    ax.grid(True, alpha=0.25)
    xs = [r["macs_speedup"] for r in runs] + [r["wall_speedup"] for r in runs if r.get("wall_speedup")]
    xs += [p["speedup"] for p in paper] + [b["speedup"] for b in baselines]
    if xs:
        ax.set_xlim(min(1.0, min(xs)) - 0.1, max(xs) * 1.08 + 0.1)

    handles = [Line2D([], [], ls="", marker="o", ms=8, color=c, label=f"{reg}") for reg, c in REG_COLOURS.items()]
    handles += [Line2D([], [], ls="", marker=m, ms=8, color="0.5", label=dec) for dec, m in DEC_MARKERS.items()]
    handles += [Line2D([], [], ls="", marker="o", ms=8, color="0.5", markeredgecolor="black", label="this run, MACs"),
                Line2D([], [], ls="", marker="o", ms=8, color="0.5", alpha=0.3, label="paper, MACs")]
    if wall_seen:
        handles.append(Line2D([], [], ls=":", marker="o", ms=8, color="0.3", markerfacecolor="white", label="this run, wall-clock"))
    handles += [Line2D([], [], ls="", marker=BASELINE_MARKERS[i % len(BASELINE_MARKERS)], ms=7, color="0.35", label=f)
                for i, f in enumerate(families)]
    fig.legend(handles=handles, loc="upper left", bbox_to_anchor=(0.7, 0.9), fontsize=8, frameon=False)
    if note:
        fig.text(0.7, 0.04, note, fontsize=7, color="0.3", wrap=True, va="bottom")
    return _png(fig)


def pareto_png(title: str, points: list[dict], panels: list[tuple[str, str]], fronts: dict[str, list[int]],
               dense_top1: float | None = None) -> bytes:
    """Accuracy against speedup, one panel per speedup measure, each with its Pareto front.

    ``points``: {method, top1, <key>: speedup or None for each panel}. ``panels``: (key, x label).
    ``fronts``: key → indices of ``points`` on that panel's front, fastest first.
    """
    fig = _figure((PARETO_PANEL_PX[0] * len(panels), PARETO_PANEL_PX[1] + 60))
    axes = fig.subplots(1, len(panels), squeeze=False).ravel()
    fig.subplots_adjust(left=0.07, right=0.98, top=0.84, bottom=0.14, wspace=0.25)
    for ax, (key, label) in zip(axes, panels):
        if dense_top1 is not None:
            ax.axhline(dense_top1, color="0.6", lw=0.8, zorder=0)
        ax.axvline(1.0, color="0.6", lw=0.8, ls="--", zorder=0)  # below 1×: slower than the dense model
        for p in points:
            if p.get(key):
                ax.scatter(p[key], p["top1"], s=45, color=METHOD_COLOURS.get(p["method"], "0.3"), edgecolors="black", lw=0.6, zorder=3)
        front = [points[i] for i in fronts.get(key, [])]
        if front:
            ax.step([p[key] for p in front], [p["top1"] for p in front], where="post", color="0.2", lw=1, zorder=2)
            ax.scatter([p[key] for p in front], [p["top1"] for p in front], s=140, facecolors="none", edgecolors="0.2", lw=1, zorder=4)
        ax.set_xlabel(label)
        ax.grid(True, alpha=0.25)
    axes[0].set_ylabel("top-1 accuracy (%)")
    handles = [Line2D([], [], ls="", marker="o", ms=7, color=c, label=m) for m, c in METHOD_COLOURS.items()]
    handles.append(Line2D([], [], ls="-", marker="o", ms=10, color="0.2", markerfacecolor="none", label="Pareto front"))
    if dense_top1 is not None:
        handles.append(Line2D([], [], color="0.6", label=f"dense {dense_top1:.2f}%"))
    fig.legend(handles=handles, loc="upper center", ncol=len(handles), fontsize=8, frameon=False, bbox_to_anchor=(0.5, 0.95))
    fig.suptitle(title, fontsize=11, y=0.995)
    return _png(fig)


# -- one run -----------------------------------------------------------------------------------
def spectra_png(before: dict[str, list[float]], after: dict[str, list[float]], ranks: dict[str, dict] | None = None, title: str = "") -> bytes:
    """Per layer: singular values (log scale) before and after SVD training; the kept rank as a line."""
    names = list(before or after)
    cols = min(SPECTRA_COLS, max(1, len(names)))
    w, h = spectra_px(len(names))
    fig = _figure((w, h))
    axes = fig.subplots(math.ceil(max(1, len(names)) / cols), cols, squeeze=False).ravel()
    fig.subplots_adjust(left=0.04, right=0.99, top=1 - 50 / h, bottom=25 / h, hspace=0.55, wspace=0.35)
    for ax in axes[len(names):]:
        ax.set_visible(False)
    for ax, name in zip(axes, names):
        for values, colour, label in ((before.get(name), "0.6", "before"), (after.get(name), "tab:blue", "after")):
            if values:
                ax.semilogy(range(1, len(values) + 1), [max(v, 1e-12) for v in values], color=colour, lw=1.2, label=label)
        r = (ranks or {}).get(name, {})
        if r.get("pruned"):
            ax.axvline(r["pruned"], color="tab:red", lw=0.8, ls="--")
        ax.set_title(f"{name}" + (f"  {r['full']}→{r['pruned']}" if r.get("pruned") else ""), fontsize=7)
        ax.yaxis.set_minor_formatter(NullFormatter())  # log-scale minor labels crowd small panels
        ax.tick_params(which="both", labelsize=6)
    fig.suptitle(title or "singular values before (grey) and after (blue) SVD training; red: rank kept by pruning", fontsize=10)
    return _png(fig)


def ranks_png(ranks: dict[str, dict], title: str = "") -> bytes:
    """Horizontal bars per layer: full rank, the rank kept by pruning, and the final rank."""
    names = list(ranks)
    fig = _figure(bars_px(len(names)))
    ax = _bars_axes(fig, len(names))
    y = range(len(names))
    ax.barh(y, [ranks[n]["full"] for n in names], color="0.85", label="full rank")
    ax.barh(y, [ranks[n].get("final", ranks[n]["pruned"]) for n in names], color="tab:blue", height=0.6, label="kept")
    _label_layers(ax, names)
    ax.set_xlabel("rank")
    ax.legend(**_LEGEND_ABOVE)
    fig.suptitle(title or "per-layer rank after pruning", fontsize=10)
    return _png(fig)


def macs_png(layers: list[dict], title: str = "") -> bytes:
    """Horizontal bars per layer: dense MACs and MACs as deployed (factored pairs vs merged dense)."""
    names = [layer["name"] for layer in layers]
    fig = _figure(bars_px(len(names)))
    ax = _bars_axes(fig, len(names))
    y = range(len(names))
    ax.barh(y, [layer["dense"] / 1e6 for layer in layers], color="0.85", label="dense")
    colours = ["tab:blue" if layer.get("factored") else "tab:orange" for layer in layers]
    ax.barh(y, [layer["deployed"] / 1e6 for layer in layers], color=colours, height=0.6)
    _label_layers(ax, names)
    ax.set_xlabel("MMACs per image")
    ax.legend(handles=[Line2D([], [], lw=6, color="0.85", label="dense"), Line2D([], [], lw=6, color="tab:blue", label="deployed: thin pair"),
                       Line2D([], [], lw=6, color="tab:orange", label="deployed: one conv")], **_LEGEND_ABOVE)
    fig.suptitle(title or "per-layer MACs, dense and as deployed", fontsize=10)
    return _png(fig)


_LEGEND_ABOVE = dict(loc="lower left", bbox_to_anchor=(0.0, 1.0), ncol=3, fontsize=8, frameon=False)  # bars fill the axes


def _bars_axes(fig: Figure, n: int):
    h = fig.get_figheight() * DPI
    return fig.add_axes((0.25, 50 / h, 0.7, 1 - 125 / h))  # room above for the legend and the title


def _label_layers(ax, names: list[str]) -> None:
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.set_ylim(len(names) - 0.5, -0.5)  # first layer on top
    ax.grid(True, axis="x", alpha=0.25)


def ladder_png(search: dict, title: str = "") -> bytes:
    """The energy line search: accuracy right after pruning, and MACs speedup, per threshold."""
    steps = search["ladder"]
    fig = _figure(LADDER_PX)
    ax = fig.add_axes((0.1, 0.12, 0.78, 0.78))
    e = [s["energy"] if s["energy"] > 0 else 1e-12 for s in steps]
    ax.semilogx(e, [s["top1"] for s in steps], "o-", color="tab:blue", label="top-1 after pruning")
    ax.axhline(search["base_top1"] - search["tolerance"], color="tab:blue", ls=":", lw=1, label="tolerance")
    ax.axvline(search["energy"], color="tab:red", ls="--", lw=1, label=f"chosen e = {search['energy']:g}")
    ax.set_xlabel("energy threshold e")
    ax.set_ylabel("top-1 (%)")
    twin = ax.twinx()
    twin.semilogx(e, [s["speedup"] for s in steps], "s--", color="tab:orange", label="MACs speedup")
    twin.set_ylabel("MACs speedup (×)")
    fig.legend(loc="center left", bbox_to_anchor=(0.11, 0.5), fontsize=8)
    ax.set_title(title or "energy line search", fontsize=10)
    return _png(fig)
