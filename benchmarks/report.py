"""Turn pytest-benchmark JSON into the published table and a speedup plot.

    python -m benchmarks.report SAVED.json [MORE.json ...] [--out DIR | --publish] [--print WHAT]

Writes DIR/report.md (default DIR: the first JSON's folder) and DIR/speedup.png (skipped,
with a note, when matplotlib is missing), and prints the markdown (or its summary).
``--publish`` writes benchmarks/results/<machine>.md and .png instead. pytest-benchmark times
each case on its own, so the ratios are taken here, across the cases of a group
(``benchmark.group`` = op[mode]/shape/dtype):

- ``x floor``: time over the floor's (the GEMMs no implementation avoids; for a layer, the
  plain nn.Linear); on CPU the median of per-round ratios to a floor call made right before
  each round (``x_floor_paired``), elsewhere the ratio of the medians;
- ``vs eager``: the authors' unfused eager time over this one (above 1: faster), through the
  paired ratios when both have them;
- ``saved``: bytes autograd keeps for backward beyond the parameters and inputs;
- ``peak``: CUDA memory one call allocates beyond what was allocated before it;
- ``predicted``, ``meas / pred`` (CUDA runs on a card the cost model knows: H100 SXM, H200):
  ``benchmarks.costmodel``'s time for the case and the measured median over it, for the
  contenders it models (the loss forward + backward and the merge forward: floor, eager and
  the triton and cuda backends).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections import defaultdict
from dataclasses import dataclass
from typing import Optional

from . import costmodel

ROLE_ORDER = {"floor": 0, "eager": 1, "compile": 2, "other": 3, "drep": 4}


@dataclass
class Row:
    group: str
    contender: str
    role: str
    median: float
    q1: Optional[float]
    q3: Optional[float]
    rounds: int
    info: dict

    @property
    def sort_key(self):
        return (ROLE_ORDER.get(self.role, 3), self.contender)


def load(paths: list[str]) -> tuple[list[Row], dict, str]:
    rows, machine, when = [], {}, ""
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        machine = machine or data.get("machine_info", {})
        when = when or data.get("datetime", "")
        rows += rows_of(data.get("benchmarks", []))
    return rows, machine, when


def rows_of(benchmarks: list[dict]) -> list[Row]:
    """Rows from pytest-benchmark's per-case dicts: a saved JSON's "benchmarks", or the live
    session's results (``as_dict()``, which benchmarks/conftest.py summarises at the end)."""
    rows = []
    for b in benchmarks:
        info = b.get("extra_info", {})
        stats = b.get("stats", {})
        median = info.get("median_s", stats.get("median"))
        if median is None:
            continue
        device_timed = info.get("timer") == "cuda_event" and "data" not in stats
        rows.append(
            Row(
                group=b.get("group") or b["name"],
                contender=info.get("contender", b.get("param", b["name"])),
                role=info.get("role", "other"),
                median=median,
                q1=None if device_timed else stats.get("q1"),
                q3=None if device_timed else stats.get("q3"),
                rounds=info.get("rounds", stats.get("rounds", 0)),
                info=info,
            )
        )
    return rows


def fmt_time(s: Optional[float]) -> str:
    if s is None or not math.isfinite(s):
        return "-"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if s >= scale:
            return f"{s / scale:.3g} {unit}"
    return f"{s / 1e-9:.3g} ns"


def fmt_bytes(n) -> str:
    if n is None:
        return "-"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n} B"


def fmt_ratio(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.2f}"


def by_group(rows: list[Row]) -> dict[str, list[Row]]:
    groups: dict[str, list[Row]] = defaultdict(list)
    for r in rows:
        groups[r.group].append(r)
    for g in groups.values():
        g.sort(key=lambda r: r.sort_key)
    return dict(sorted(groups.items(), key=lambda kv: _group_key(kv[0], kv[1])))


def _group_key(name: str, rows: list[Row]):
    i = rows[0].info
    return (i.get("op", name), i.get("mode", ""), i.get("dtype", ""), i.get("M", 0), i.get("K", 0), i.get("out", 0))


def _reference(rows: list[Row], role: str) -> Optional[Row]:
    return next((r for r in rows if r.role == role), None)


def x_floor(rows: list[Row], r: Row) -> Optional[float]:
    """r's time over the floor's: the paired ratio when the run measured one (CPU), else the
    ratio of the medians."""
    if r.role == "floor":
        return 1.0
    if r.info.get("x_floor_paired") is not None:
        return r.info["x_floor_paired"]
    floor = _reference(rows, "floor")
    return r.median / floor.median if floor else None


def speedup(rows: list[Row], ref: Optional[Row], r: Row) -> Optional[float]:
    """ref's time over r's: through the floor when both are paired with it, else medians."""
    if ref is None:
        return None
    paired = all(x.role == "floor" or x.info.get("x_floor_paired") is not None for x in (ref, r))
    a, b = x_floor(rows, ref), x_floor(rows, r)
    if paired and a is not None and b:
        return a / b
    return ref.median / r.median


def ratios(rows: list[Row], r: Row) -> tuple[Optional[float], Optional[float]]:
    return x_floor(rows, r), speedup(rows, _reference(rows, "eager"), r)


# The (op, mode) cases the cost model covers: the loss forward + backward, the merge forward.
_MODELLED_MODES = {("denoise_loss", "full"), ("merge_weights", "forward")}


def predicted(r: Row) -> Optional[float]:
    """The cost model's seconds for r's case; None on CPU runs, on cards the model has no
    figures for, and for ops, modes and contenders it does not model (torch, compile)."""
    i = r.info
    gpu = costmodel.gpu_for_device(i.get("device_name", "")) if i.get("device") == "cuda" else None
    op = i.get("op")
    if gpu is None or (op, i.get("mode")) not in _MODELLED_MODES or i.get("dtype") not in costmodel.DTYPES:
        return None
    c = r.contender
    backend = c[5:-1] if c.startswith("drep[") else c
    if backend not in costmodel.backends(op):
        return None
    return costmodel.predict(op, backend, i.get("M", 0), i["K"], i["dtype"], gpu, out=i.get("out", 0))


def fmt_meas_over_pred(r: Row) -> str:
    p = predicted(r)
    return "-" if p is None else f"{r.median / p:.2f}"


def group_table(rows: list[Row]) -> list[str]:
    cuda = any(r.info.get("device") == "cuda" for r in rows)
    head = ["contender", "median"] + (["predicted", "meas / pred"] if cuda else [])
    head += ["q1 - q3", "rounds", "GFLOP/s", "x floor", "vs eager", "saved"]
    if cuda:
        head.append("peak")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        xf, vs_eager = ratios(rows, r)
        name = r.contender
        used = r.info.get("backend_used")
        if used and r.contender in ("drep[default]",):
            name += f" ({used})"
        spread = f"{fmt_time(r.q1)} - {fmt_time(r.q3)}" if r.q1 is not None else "-"
        gflops = r.info.get("gflops")
        saved = r.info.get("saved_extra_bytes")
        cells = [name, fmt_time(r.median)]
        if cuda:
            cells += [fmt_time(predicted(r)), fmt_meas_over_pred(r)]
        cells += [
            spread,
            str(r.rounds),
            "-" if gflops is None else f"{gflops:.1f}",
            fmt_ratio(xf),
            fmt_ratio(vs_eager),
            fmt_bytes(saved),
        ]
        if cuda:
            cells.append(fmt_bytes(r.info.get("peak_extra_bytes")))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def summary_table(groups: dict[str, list[Row]]) -> list[str]:
    """One line per group: the fastest drep contender against eager, compile and the floor."""
    cuda = any(r.info.get("device") == "cuda" for rows in groups.values() for r in rows)
    head = ["group", "floor (or plain layer)", "eager", "compile", "best drep", "drep median"]
    head += (["predicted"] if cuda else []) + ["x floor", "vs eager", "vs compile"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, rows in groups.items():
        drep = [r for r in rows if r.role == "drep"]
        if not drep:
            continue
        best = min(drep, key=lambda r: (x_floor(rows, r) or math.inf, r.median))
        floor, eager = _reference(rows, "floor"), _reference(rows, "eager")
        comp = next((r for r in rows if r.contender == "compile"), None)
        xf, vs_eager = ratios(rows, best)
        lines.append(
            "| "
            + " | ".join(
                [
                    f"`{name}`",
                    fmt_time(floor.median) if floor else "-",
                    fmt_time(eager.median) if eager else "-",
                    fmt_time(comp.median) if comp else "-",
                    best.contender,
                    fmt_time(best.median),
                ]
                + ([fmt_time(predicted(best))] if cuda else [])
                + [
                    fmt_ratio(xf),
                    fmt_ratio(vs_eager),
                    fmt_ratio(speedup(rows, comp, best)),
                ]
            )
            + " |"
        )
    return lines


def header(machine: dict, when: str, rows: list[Row]) -> list[str]:
    env = machine.get("drep", {})
    cpu = machine.get("cpu", {}).get("brand_raw", "")
    device = env.get("device_name") or (rows[0].info.get("device_name") if rows else "") or cpu
    lines = [
        f"- device: {device}" + (f" ({env['capability']})" if env.get("capability") else ""),
        f"- host CPU: {cpu} ({machine.get('cpu', {}).get('count', '?')} logical cores)"
        if cpu and env.get("device") == "cuda" else "",
        f"- torch {env.get('torch', rows[0].info.get('torch', '?') if rows else '?')}"
        + (f" (CUDA {env['torch_cuda']})" if env.get("torch_cuda") else "")
        + f", triton {env.get('triton') or 'not installed'}, python {machine.get('python_version', '?')}",
        f"- backends built: {env['backends']}" if env.get("backends") else "",
        f"- CPU vector extensions: {', '.join(env['cpu_vector_extensions']) or 'none listed'}; the CPU kernels' "
        f"vector path: {env['cpu_vector_path']}" if "cpu_vector_path" in env else "",
        f"- BLAS: {env['blas']}" if env.get("blas") else "",
        f"- date: {when}" if when else "",
        f"- command: `{env['command']}`" if env.get("command") else "",
        f"- suite time: {env['elapsed_s']:.0f} s (pytest session)" if env.get("elapsed_s") is not None else "",
        "- CPU times on a shared machine are noisy: read the paired ratios more than the times"
        if env.get("device", "cpu") == "cpu" else "",
    ]
    return [line for line in lines if line]


def skipped_section(machine: dict) -> list[str]:
    """The cases the run did not measure, grouped by reason."""
    skipped = machine.get("drep", {}).get("skipped") or []
    if not skipped:
        return []
    reasons: dict[str, list[str]] = defaultdict(list)
    for s in skipped:
        reasons[s["reason"]].append(s["case"])
    out = ["## Not measured", ""]
    for reason, cases in reasons.items():
        out.append(f"- {reason}: " + ", ".join(f"`{c}`" for c in cases))
    return out + [""]


def slug(machine: dict) -> str:
    """A file name for this machine: the GPU's name, or cpu-<model>-<N>cores."""
    env = machine.get("drep", {})
    if env.get("device") == "cuda":
        name = env.get("device_name", "gpu")
    else:
        cpu = machine.get("cpu", {})
        name = f"cpu {cpu.get('brand_raw') or env.get('device_name', '')} {cpu.get('count', '')}cores"
    return "-".join("".join(c if c.isalnum() else " " for c in name.lower()).split())


def markdown(rows: list[Row], machine: dict, when: str, title: str, png: Optional[str] = None) -> str:
    groups = by_group(rows)
    out = [f"# {title}", ""] + header(machine, when, rows) + [""]
    out += [
        "Times are medians of the rounds shown (CPU: wall clock per call; CUDA: CUDA events per call).",
        "`x floor`: time / floor time; `vs eager`: eager time / time (above 1 is faster than the authors'",
        "unfused code). Where the run paired each round with a floor call made just before it (CPU),",
        "both are medians of the per-round ratios (robust to a shared machine's changing load);",
        "elsewhere ratios of the medians. `saved`: bytes autograd keeps for backward beyond",
        "parameters and inputs.",
    ]
    if any(r.info.get("device") == "cuda" for r in rows):
        out += [
            "`predicted`: the cost model's time for the case (`python -m benchmarks.costmodel`; a model, not a",
            "measurement: benchmarks/results/costmodel-h100-h200.md lists its assumptions); `meas / pred`: the",
            "measured median over it. `-` where the model has no figures (other cards, ops, contenders).",
        ]
    out += [
        "",
        "## Summary",
        "",
    ]
    out += summary_table(groups) + [""]
    if png:
        out += [f"![speedup vs unfused eager]({png})", ""]
    out += skipped_section(machine)
    out += ["## Per group", ""]
    for name, g in groups.items():
        out += [f"### `{name}`", ""] + group_table(g) + [""]
    return "\n".join(out)


def plot(rows: list[Row], path: str) -> str:
    """speedup vs eager against K, one panel per op[mode], one line per contender/dtype/M."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib import ticker
    except ImportError:
        return "PNG skipped: matplotlib is not installed"
    groups = by_group(rows)
    series: dict[str, dict[tuple, list[tuple[int, float]]]] = defaultdict(lambda: defaultdict(list))
    for rs in groups.values():
        eager = _reference(rs, "eager")
        if eager is None:
            continue
        for r in rs:
            if r.role == "eager":
                continue
            i = r.info
            panel = f"{i.get('op')}[{i.get('mode')}]"
            rows_label = f"M={i['M']}" if i.get("M") else f"out={i.get('out')}"
            key = (r.contender, i.get("dtype"), rows_label if i.get("op") == "denoise_loss" else "")
            series[panel][key].append((i.get("K", 0), speedup(rs, eager, r)))
    if not series:
        return "PNG skipped: no group has an eager baseline"
    panels = sorted(series)
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6 * ncols, 4.2 * nrows), squeeze=False)
    # One colour per contender and one line style per dtype, the same in every panel.
    contenders = sorted({k[0] for panel in series.values() for k in panel})
    colours = {c: plt.cm.tab10(i % 10) for i, c in enumerate(contenders)}
    dtypes = sorted({k[1] for panel in series.values() for k in panel})
    styles = dict(zip(dtypes, ["-", "--", ":", "-."] * 3))
    markers = ["o", "s", "^", "v", "D"]
    for ax, panel in zip(axes.flat, panels):
        extras = sorted({k[2] for k in series[panel]})
        for (contender, dtype, extra), pts in sorted(series[panel].items()):
            pts.sort()
            label = " ".join(x for x in (contender, dtype, extra) if x)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], styles[dtype], color=colours[contender],
                    marker=markers[extras.index(extra) % len(markers)], label=label)
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        plain = ticker.FuncFormatter(lambda v, _: f"{v:g}")  # plain numbers, not powers
        ax.xaxis.set_major_formatter(plain)
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        ax.yaxis.set_major_formatter(plain)
        lo, hi = ax.get_ylim()
        ax.yaxis.set_minor_formatter(plain if hi / lo < 6 else ticker.NullFormatter())
        ax.set_title(panel)
        ax.set_xlabel("K (denoiser width)")
        ax.set_ylabel("speedup vs unfused eager")
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"PNG written: {os.path.basename(path)}"


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("json", nargs="+", help="pytest-benchmark JSON files (--benchmark-json)")
    parser.add_argument("--out", help="output folder (default: the first JSON's folder)")
    parser.add_argument("--md", default="report.md", help="markdown file name in --out (default report.md)")
    parser.add_argument("--png", default="speedup.png", help="plot file name in --out (default speedup.png)")
    parser.add_argument(
        "--publish", action="store_true",
        help="write benchmarks/results/<machine>.md and .png (the published files) instead",
    )
    parser.add_argument("--title", default="drep-kernels benchmarks")
    parser.add_argument(
        "--print", dest="show", choices=("full", "summary", "none"), default="full",
        help="what to print: the whole markdown (default), the summary table, nothing",
    )
    args = parser.parse_args(argv)
    paths = [p for p in args.json if os.path.exists(p)]
    for p in args.json:
        if p not in paths:
            print(f"report: {p} not found, left out", file=sys.stderr)
    if not paths:
        print("report: no JSON to read", file=sys.stderr)
        return 2
    rows, machine, when = load(paths)
    if not rows:
        print("report: the JSON holds no benchmark results", file=sys.stderr)
        return 2
    out = args.out or os.path.dirname(os.path.abspath(paths[0]))
    if args.publish:
        out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
        args.md, args.png = slug(machine) + ".md", slug(machine) + ".png"
        if args.title == parser.get_default("title"):
            args.title = f"drep-kernels on {slug(machine)}"
    os.makedirs(out, exist_ok=True)
    png_note = plot(rows, os.path.join(out, args.png))
    text = markdown(rows, machine, when, args.title, png=args.png if png_note.startswith("PNG written") else None)
    text += f"\n{png_note}\n"
    with open(os.path.join(out, args.md), "w") as f:
        f.write(text)
    if args.show == "full":
        print(text)
    elif args.show == "summary":
        print("\n".join(summary_table(by_group(rows))))
        print(png_note)
    print(f"report: wrote {os.path.join(out, args.md)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
