#!/usr/bin/env python3
"""Plots `vattn bench --json` results: speed-up over dense against context length (one panel per
batch size) and output error against density, per method and predictor.

    ./build/release/vattn bench --context 4096,16384,65536 --json > bench.json
    python3 bench/plot.py bench.json -o bench.png        # .png or .svg
"""
import argparse
import json
import os
import sys
import textwrap


def load(paths):
    """Rows of every file, each tagged with its source (when there are several files)."""
    rows, meta = [], []
    for path in paths:
        try:
            with open(path) as f:
                doc = json.load(f)
        except (OSError, ValueError) as e:
            sys.exit(f"plot.py: cannot read {path}: {e}")
        if doc.get("command") != "bench" or "rows" not in doc:
            sys.exit(f"plot.py: {path} is not the JSON output of `vattn bench --json`")
        tag = os.path.splitext(os.path.basename(path))[0]
        for r in doc["rows"]:
            rows.append(dict(r, source=tag))
        meta.append(doc)
    if not rows:
        sys.exit("plot.py: no rows in the input")
    return rows, meta


def method_name(r):
    return r["method"] if r["predictor"] == "-" else f'{r["method"]}/{r["predictor"]}'


def group_name(r, many_sources, many_families):
    """The file and family a row came from, when there are several."""
    parts = ([r["source"]] if many_sources else []) + ([r["family"]] if many_families else [])
    return " ".join(parts)


def series_key(r, many_sources, many_families):
    return " ".join(filter(None, [group_name(r, many_sources, many_families), method_name(r)]))


def title(meta):
    m, a = meta[0]["machine"], meta[0]["args"]
    t = (f'{m["cpu"]}, {m["threads"]} threads, {m["simd"]}, stream {m["stream_gbs"]:.1f} GB/s; '
         f'{a["n_head_q"]}/{a["n_head_kv"]} heads, d={a["head_dim"]}, {a["dtype"]}, '
         f'{a["layout"]}')
    if len(meta) > 1:
        t += f" (and {len(meta) - 1} more file{'s' if len(meta) > 2 else ''})"
    return t


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("inputs", nargs="+", help="JSON files written by `vattn bench --json`")
    ap.add_argument("-o", "--output", required=True, help="figure path, .png or .svg")
    ap.add_argument("--dpi", type=int, default=130, help="resolution of a PNG")
    args = ap.parse_args()
    ext = os.path.splitext(args.output)[1].lower()
    if ext not in (".png", ".svg"):
        sys.exit(f"plot.py: -o must end in .png or .svg, got '{args.output}'")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib import ticker
        from matplotlib.lines import Line2D
    except ImportError:
        sys.exit("plot.py needs matplotlib: pip install matplotlib (or apt install "
                 "python3-matplotlib)")

    rows, meta = load(args.inputs)
    many_sources = len({r["source"] for r in rows}) > 1
    many_families = len({r["family"] for r in rows}) > 1
    batches = sorted({r["batch"] for r in rows})
    # Colour by method/predictor, marker and line style by file and family.
    keys, names, groups, style = [], [], [], {}
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    markers, lines = "osD^v<>ph*", ["-", "--", ":", "-."]
    for r in rows:
        if r["method"] == "dense":
            continue
        k = series_key(r, many_sources, many_families)
        if k in style:
            continue
        n, g = method_name(r), group_name(r, many_sources, many_families)
        names += [n] if n not in names else []
        groups += [g] if g not in groups else []
        ni, gi = names.index(n), groups.index(g)
        style[k] = (colors[ni % len(colors)],
                    markers[(gi + ni // len(colors)) % len(markers)], lines[gi % len(lines)])
        keys.append(k)

    fig = plt.figure(figsize=(max(6.5, 4.2 * len(batches)), 9.5), constrained_layout=True)
    grid = fig.add_gridspec(2, len(batches))
    fig.suptitle(textwrap.fill(title(meta), 90), fontsize=9)  # long machine names wrap

    # (1) speed-up over dense against context, one panel per batch size.
    first = None
    for bi, batch in enumerate(batches):
        ax = fig.add_subplot(grid[0, bi], sharey=first)
        first = first or ax
        for k in keys:
            pts = sorted((r["context"], r["speedup_vs_dense"]) for r in rows
                         if r["batch"] == batch and r["method"] != "dense"
                         and series_key(r, many_sources, many_families) == k
                         and r["speedup_vs_dense"] is not None)
            if pts:
                c, m, ls = style[k]
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=m, color=c,
                        linestyle=ls)
        ax.axhline(1.0, color="gray", linestyle="--", linewidth=1)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda y, _: f"{y:g}"))
        ax.set_xlabel("context (tokens)")
        if bi == 0:
            ax.set_ylabel("speed-up over dense (median times)")
        ax.set_title(f"batch {batch}", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)

    # (2) error against density: mean (filled) and p95 (hollow), joined per row.
    ax = fig.add_subplot(grid[1, :])
    positive = True
    for k in keys:
        sel = [r for r in rows
               if r["method"] != "dense" and series_key(r, many_sources, many_families) == k]
        if not sel:
            continue
        c, m, _ = style[k]
        x = [r["density"] for r in sel]
        mean = [r["err_mean"] for r in sel]
        p95 = [r["err_p95"] for r in sel]
        positive = positive and min(mean) > 0 and min(x) > 0
        ax.vlines(x, mean, p95, color=c, alpha=0.5, linewidth=1)
        ax.scatter(x, mean, color=c, marker=m)
        ax.scatter(x, p95, facecolors="none", edgecolors=c, marker=m)
    if positive:
        ax.set_xscale("log")
        ax.set_yscale("log")
    ax.set_xlabel("density (tokens read / n)")
    ax.set_ylabel("||O - O_dense|| / ||O_dense||")
    ax.set_title("error against density: mean (filled) and p95 (hollow) of each context and "
                 "batch", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    # One legend for both plots, right of the error panel.
    handles = [Line2D([], [], color=style[k][0], marker=style[k][1], linestyle=style[k][2],
                      label=k) for k in keys]
    handles.append(Line2D([], [], color="gray", linestyle="--", label="dense (speed-up 1)"))
    handles.append(Line2D([], [], color="gray", marker="o", markerfacecolor="none",
                          linestyle="none", label="p95 error (hollow)"))
    ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))

    fig.savefig(args.output, dpi=args.dpi)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
