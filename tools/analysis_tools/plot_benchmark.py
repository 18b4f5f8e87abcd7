"""Plot how latency and peak memory of ``benchmark.py`` results grow with the input size.

Reads one or more JSON files written by ``benchmark.py --json`` and draws a grid of panels: one
column per mode (``fwd``, ``fwd+bwd``), one row for the median latency (bars: the fastest and
slowest timed iteration) and one for the peak memory, against the pixels of one iteration's
input (width x height x batch) or, with ``--x macs``, against the model's MACs at that input.
One line per model spec (``datpp-t:fast``, ``swin-t``, ...) and batch (a line joins the input
sizes of one batch; each batch has its marker), log-log axes. The figure's footer names the
JSON files and the machines they were measured on (CPU or GPU, threads, torch). Written with
matplotlib's Agg backend (no display needed).

A result whose model, input and mode appear in an earlier file replaces it (and says so).
With ``--x macs``, results without a MAC count (files of an older ``benchmark.py``, models it
could not count) are left out, and the tool says which.

Example::

    python tools/analysis_tools/plot_benchmark.py docs/bench/cpu_datpp-t_vs_swin-t_macs.json \\
        --out docs/bench/cpu_datpp-t_vs_swin-t_macs.png
"""

from __future__ import annotations

import argparse
import itertools
import json
from collections.abc import Sequence
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

MODES = ('fwd', 'fwd+bwd')
X_AXES = {
    'pixels': 'input pixels per iteration (width x height x batch)',
    'macs': 'GMACs of one forward pass',
}


def input_label(job: dict[str, Any]) -> str:
    """``'512x832@1'``, ``'224@32'`` (a square input by its side), as ``benchmark.py`` takes them."""
    size = str(job['width']) if job['width'] == job['height'] else f'{job["width"]}x{job["height"]}'
    return f'{size}@{job["batch"]}'


def load_results(paths: Sequence[str], log: Any = print) -> tuple[list[dict[str, Any]], list[str]]:
    """The results of the files, a later file's result replacing an earlier one of the same case.

    Args:
        paths (Sequence[str]): JSON files of ``benchmark.py --json``.
        log (callable): Printer of the replacements.

    Returns:
        tuple: the results, and one description per file (its name, CPU or GPU, threads, torch).
    """
    cases: dict[tuple, dict[str, Any]] = {}
    sources = []
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        machine = data.get('machine', {})
        device = machine.get('gpu') or machine.get('cpu', 'unknown machine')
        sources.append(f'{path} ({device}, {machine.get("threads")} threads, torch {machine.get("torch")})')
        for r in data['results']:
            job = r['job']
            key = (job['model'], input_label(job), job['mode'])
            if key in cases:
                log(f"{' '.join(key)}: the result of {path} replaces an earlier file's")
            cases[key] = r
    return list(cases.values()), sources


def x_value(result: dict[str, Any], x: str) -> float | None:
    """The result's position on the x axis: its input's pixels, or its GMACs (None if not counted)."""
    job = result['job']
    if x == 'pixels':
        return job['width'] * job['height'] * job['batch']
    macs = result.get('macs')
    return None if macs is None else macs / 1e9


def plot(results: Sequence[dict[str, Any]], sources: Sequence[str], x: str = 'pixels', log: Any = print) -> Figure:
    """The figure: latency and peak memory per mode, one line per model spec (and batch).

    Args:
        results (Sequence[dict]): ``benchmark.py`` results.
        sources (Sequence[str]): What the footer names as the data's origin.
        x (str): ``'pixels'`` or ``'macs'`` (see :data:`X_AXES`).
        log (callable): Printer of the results left out.

    Returns:
        Figure: A matplotlib figure with an Agg canvas.

    Raises:
        ValueError: If no result can be placed on the x axis.
    """
    if x not in X_AXES:
        raise ValueError(f'x must be one of {tuple(X_AXES)}, got {x!r}')
    placed = [r for r in results if x_value(r, x) is not None]
    for r in results:
        if x_value(r, x) is None:
            log(f'{r["job"]["model"]} {input_label(r["job"])} {r["job"]["mode"]}: no MAC count, left out')
    if not placed:
        raise ValueError(f'no result to plot against {x}')
    modes = [m for m in MODES if any(r['job']['mode'] == m for r in placed)]
    models = list(dict.fromkeys(r['job']['model'] for r in placed))
    batches = sorted({r['job']['batch'] for r in placed})
    fig = Figure(figsize=(5.5 * len(modes), 8.5), layout='constrained')
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, len(modes), squeeze=False)
    for col, mode in enumerate(modes):
        time_ax, mem_ax = axes[0][col], axes[1][col]
        for (i, model), (j, batch) in itertools.product(enumerate(models), enumerate(batches)):
            points = sorted(
                (x_value(r, x), r)
                for r in placed
                if (r['job']['model'], r['job']['batch'], r['job']['mode']) == (model, batch, mode)
            )
            if not points:
                continue
            # A model's colour; a batch's marker and line style: a line joins the inputs of one batch only.
            style = dict(color=f'C{i % 10}', marker='os^D'[j % 4], linestyle=('-', '--', ':', '-.')[j % 4])
            label = model if len(batches) == 1 else f'{model}, batch {batch}'
            xs = [p for p, _ in points]
            lat = [r['latency_ms'] for _, r in points]
            spread = [[v['median'] - v['min'] for v in lat], [v['max'] - v['median'] for v in lat]]
            time_ax.errorbar(xs, [v['median'] for v in lat], yerr=spread, capsize=3, label=label, **style)
            mem_ax.plot(xs, [r['peak_mem_mib'] for _, r in points], label=label, **style)
            if x == 'macs':  # the models' points of one input lie apart: name each point's input
                for value, r in points:
                    for ax, y in ((time_ax, r['latency_ms']['median']), (mem_ax, r['peak_mem_mib'])):
                        ax.annotate(input_label(r['job']), (value, y), (4, -10), textcoords='offset points', fontsize=7)
        time_ax.set_title(f'{mode}: latency (median; bars: min-max)')
        time_ax.set_ylabel('ms per iteration')
        mem_ax.set_title(f'{mode}: peak memory')
        mem_ax.set_ylabel('MiB')
        for ax in (time_ax, mem_ax):
            ax.set_xscale('log')
            ax.set_yscale('log')
            ax.set_xlabel(X_AXES[x])
            ax.grid(True, which='both', alpha=0.3)
            if x == 'pixels':
                inputs = {x_value(r, x): input_label(r['job']) for r in placed if r['job']['mode'] == mode}
                ticks = [f'{label} ({px / 1e6:.2f} Mpx)' for px, label in inputs.items()]
                ax.set_xticks(list(inputs), ticks, rotation=30, ha='right', fontsize=8)
                ax.minorticks_off()
    legend = {}  # one entry per line, from whichever panel has it
    for ax in axes[0]:
        legend.update(zip(*reversed(ax.get_legend_handles_labels()), strict=True))
    fig.legend(legend.values(), legend.keys(), loc='outside upper center', ncols=min(len(legend), 3), fontsize=8)
    fig.supxlabel('data: ' + '\n'.join(sources), fontsize=8)
    return fig


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description='Plot latency and peak memory of benchmark.py results against the input size',
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    parser.add_argument('json', nargs='+', help='JSON files written by benchmark.py --json')
    parser.add_argument('--out', required=True, help='PNG file to write')
    parser.add_argument('--x', choices=tuple(X_AXES), default='pixels', help='x axis (default: pixels)')
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> str:
    args = parse_args(argv)
    results, sources = load_results(args.json)
    fig = plot(results, sources, args.x)
    fig.savefig(args.out, dpi=120)
    print(f'wrote {args.out} ({len(results)} results from {", ".join(args.json)})')
    return args.out


if __name__ == '__main__':
    main()
