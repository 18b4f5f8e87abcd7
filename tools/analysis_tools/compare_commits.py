"""Speed of two commits of this repository, measured in one sitting: is the new one slower?

A worktree is checked out for each commit, and ``benchmark.py`` of that worktree runs with its
own package (``PYTHONPATH`` set to the worktree) once per round, the commits alternating (the
order flips every round, so that neither always runs first after the other). A first, untimed
run of each commit builds its C++ kernels and warms the caches. The table gives, per model,
input and mode, the median over all timed iterations of every round of each commit, their
ratio new/old, and the median of the per-round ratios (round i of the two commits ran back to
back, under the same load; this one is the less sensitive to a load that changes during the
sitting); the JSON keeps the commits, the exact benchmark command and every round's
results.

Example (everything after ``--`` goes to ``benchmark.py``)::

    python tools/analysis_tools/compare_commits.py 96e6477 HEAD --rounds 3 \\
        --json docs/bench/ab_96e6477_vs_HEAD.json -- \\
        --models datpp-t --inputs 224@32 1344x800@1 --modes fwd fwd+bwd --warmup 2 --repeats 5

The ``--models`` and ``--inputs`` specs must be ones that both commits' ``benchmark.py``
accept.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

REPO_ROOT = Path(__file__).resolve().parents[2]
BENCHMARK = Path('tools', 'analysis_tools', 'benchmark.py')


def git(*args: str, cwd: Path = REPO_ROOT) -> str:
    return subprocess.run(['git', *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def resolve_commit(rev: str) -> str:
    try:
        return git('rev-parse', '--verify', f'{rev}^{{commit}}')
    except subprocess.CalledProcessError:
        raise SystemExit(f'compare_commits: {rev!r} is not a commit of {REPO_ROOT}') from None


def run_benchmark(worktree: Path, benchmark_args: Sequence[str], json_path: Path) -> list[dict[str, Any]]:
    """Run one commit's benchmark.py with that commit's package; its log goes to our stdout."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(worktree), os.environ.get('PYTHONPATH')])))
    cmd = [sys.executable, str(worktree / BENCHMARK), *benchmark_args, '--json', str(json_path)]
    subprocess.run(cmd, cwd=worktree, env=env, check=True)
    return json.loads(json_path.read_text())['results']


def case_key(result: dict[str, Any]) -> str:
    job = result['job']
    return f'{job["model"]} {job["width"]}x{job["height"]}@{job["batch"]} {job["mode"]}'


def summarise(rounds: dict[str, list[list[dict[str, Any]]]]) -> list[dict[str, Any]]:
    """Per case: the median latency over every timed iteration of all rounds of each commit,
    the per-round medians, the ratio new/old of the overall medians, and the median of the
    per-round ratios."""
    cases = {}
    for side in ('old', 'new'):
        for round_results in rounds[side]:
            for r in round_results:
                entry = cases.setdefault(case_key(r), dict(case=case_key(r), old=[], new=[]))
                entry[side].append(r['latency_ms']['all'])
    summary = []
    for entry in cases.values():
        row = dict(case=entry['case'])
        for side in ('old', 'new'):
            row[f'{side}_median_ms'] = statistics.median(t for run in entry[side] for t in run)
            row[f'{side}_round_medians_ms'] = [statistics.median(run) for run in entry[side]]
        row['new_over_old'] = row['new_median_ms'] / row['old_median_ms']
        # Round i of each commit ran back to back: their ratio sees the same machine load.
        pairs = zip(row['new_round_medians_ms'], row['old_round_medians_ms'], strict=True)
        row['round_ratios'] = [n / o for n, o in pairs]
        row['median_round_ratio'] = statistics.median(row['round_ratios'])
        summary.append(row)
    return summary


def format_table(summary: list[dict[str, Any]], old: str, new: str) -> str:
    width = max(len(row['case']) for row in summary)
    header = f'{"case":<{width}}  {"old " + old[:7] + " ms":>16}  {"new " + new[:7] + " ms":>16}  new/old'
    lines = [header + '  median of round ratios']
    for row in summary:
        lines.append(
            f'{row["case"]:<{width}}  {row["old_median_ms"]:>16.1f}  {row["new_median_ms"]:>16.1f}  '
            f'{row["new_over_old"]:7.3f}  {row["median_round_ratio"]:.3f}'
        )
    return '\n'.join(lines)


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, list[str]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    benchmark_args = []
    if '--' in argv:
        split = argv.index('--')
        argv, benchmark_args = argv[:split], argv[split + 1 :]
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('old', help='the commit to compare against (any git revision)')
    parser.add_argument('new', help='the commit under test (any git revision)')
    parser.add_argument('--rounds', type=int, default=3, help='timed runs of each commit (default 3)')
    parser.add_argument('--json', help='write the commits, the command and all results to this file')
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f'--rounds must be at least 1, got {args.rounds}')
    if not benchmark_args:
        parser.error('give the benchmark.py arguments after "--", e.g. -- --models datpp-t --inputs 224@32')
    if '--json' in benchmark_args:
        parser.error('--json after "--" is set by this tool; give --json before "--"')
    return args, benchmark_args


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    args, benchmark_args = parse_args(argv)
    commits = dict(old=resolve_commit(args.old), new=resolve_commit(args.new))
    rounds = dict(old=[], new=[])
    with tempfile.TemporaryDirectory(prefix='dat-compare-') as tmp:
        tmp = Path(tmp)
        worktrees = {side: tmp / side for side in commits}
        for side, commit in commits.items():
            git('worktree', 'add', '--detach', str(worktrees[side]), commit)
        try:
            for side in commits:
                print(f'== warm-up run of {side} ({commits[side][:7]}): builds kernels, not counted', flush=True)
                run_benchmark(worktrees[side], [*benchmark_args, '--warmup', '1', '--repeats', '1'], tmp / 'warm.json')
            for i in range(args.rounds):
                order = ('old', 'new') if i % 2 == 0 else ('new', 'old')
                for side in order:
                    t0 = time.perf_counter()
                    label = f'== round {i + 1}/{args.rounds}: {side} ({commits[side][:7]})'
                    print(label, flush=True)
                    rounds[side].append(run_benchmark(worktrees[side], benchmark_args, tmp / f'{side}{i}.json'))
                    print(f'{label} done in {time.perf_counter() - t0:.0f} s', flush=True)
        finally:
            for worktree in worktrees.values():
                git('worktree', 'remove', '--force', str(worktree))
    summary = summarise(rounds)
    print()
    print(format_table(summary, commits['old'], commits['new']))
    if args.json:
        tool = 'tools/analysis_tools/compare_commits.py'
        command = ['python', tool, args.old, args.new, '--rounds', str(args.rounds)]
        record = dict(
            commits=commits,
            command=' '.join([*command, '--json', args.json, '--', *benchmark_args]),
            summary=summary,
            rounds=rounds,
        )
        Path(args.json).write_text(json.dumps(record, indent=2) + '\n')
    return summary


if __name__ == '__main__':
    main()
