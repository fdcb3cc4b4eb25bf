"""Tables of results next to the paper's and the authors' notebooks' numbers.

  python -m experiments.tables [paper] ROOT [ROOT ...] --out DIR [--note TEXT]
  python -m experiments.tables run WORKDIR NAME "COMMAND THAT MADE IT" [NOTE]
  python -m experiments.tables runs OUT.md "COMMAND THAT MADE THEM" RESULTS.json...

paper (the default): the paper's Fashion-MNIST tables (3, 1, 2, 4, 8 and a
chunking study) from every results.json under the roots (a workdir's, named
after its directory and read with the resolved config.json beside it, and
every other *.json there that is a results.json copy, named after the file,
e.g. experiments/results/gpu_h200_fmnist/ff4.json). Runs with the same
configuration are pooled: mean ± sample std over the distinct runs
(distinct = different seed or different parameters digest). Writes
DIR/tables.md, DIR/tables.json and three plots (DIR/acc_vs_n.png,
DIR/acc_vs_params.png, DIR/student_mse.png; needs matplotlib). How older
results.json files are read: experiments/records.py.

run: one run's results.json next to the paper; copies it to
experiments/results/NAME.json (or --to DIR) with a markdown summary NAME.md.

runs: one row per results.json (any dataset of the paper's Table 3): test
accuracy before and after head fine-tuning, the paper's and the notebooks'
number for its method and n, student MSE, parameters and seconds.
"""
import argparse
import json
import os
import shutil

from experiments import fmnist_tables
from experiments import paper
from experiments import plots
from experiments import records
from experiments.common import RESULTS, command, show

COMMANDS = ('paper', 'run', 'runs')


# ------------------------------------------------------------------ paper

def paper_tables(roots, out, note, cmd):
  """Writes OUT/tables.md, OUT/tables.json and the plots; the markdown."""
  recs, skipped = records.load(roots)
  if not recs:
    raise SystemExit(f'error: no Fashion-MNIST results.json under {roots}')
  t = fmnist_tables.Tables(recs)
  t.table3()
  t.table1()
  t.table2()
  t.table4()
  t.table8()
  t.chunking()
  os.makedirs(out, exist_ok=True)
  files = plots.plots(t, out)
  sources = [f'`{show(r.path)}` ({r.name}: {r.r["method"]}'
             f'{" " + r.target if r.target else ""}, n={r.n}, seed {r.seed}, '
             f'{r.backend}{", data subset" if r.subset else ""})'
             for r in recs]
  md = ['# Fashion-MNIST: the paper\'s tables from our runs', '',
        f'Command: `{cmd}`', '']
  if note:
    md += [note, '']
  md += ['Sources: ' + '; '.join(sources) + '.', '']
  if skipped:
    md += ['Skipped (not Fashion-MNIST): ' + '; '.join(skipped) + '.', '']
  if any(r.subset for r in recs):
    md += ['**Some sources ran on a data subset (smoke preset): their '
           'numbers are not comparable with the paper.**', '']
  md += ['Plots: ' + ', '.join(f'[{f}]({f})' for f in files) + '.', '',
         '![accuracy vs n](acc_vs_n.png)', '', *t.md,
         '![accuracy vs parameters](acc_vs_params.png)', '',
         '![per-student MSE](student_mse.png)']
  with open(os.path.join(out, 'tables.md'), 'w') as f:
    f.write('\n'.join(md) + '\n')
  with open(os.path.join(out, 'tables.json'), 'w') as f:
    json.dump({'command': cmd,
               'sources': [show(r.path) for r in recs],
               'plots': files, **t.data}, f, indent=1)
  return md


# -------------------------------------------------------------------- run

def run_summary(workdir, name, cmd, note='', to=RESULTS):
  """Copies WORKDIR/results.json to TO/NAME.json and writes TO/NAME.md: the
  run's accuracies next to the paper's FF number for its n."""
  with open(os.path.join(workdir, 'results.json')) as f:
    r = json.load(f)
  os.makedirs(to, exist_ok=True)
  shutil.copy(os.path.join(workdir, 'results.json'),
              os.path.join(to, name + '.json'))
  ds, n = r['dataset'], r['num_students']
  ours_paper = paper.TABLE3.get(ds, {})
  nb = paper.NOTEBOOKS.get(ds, {})
  pct = lambda v: f'{100 * v:.2f}'
  mse = ', '.join(f'{v:.4f}' for v in r['student_val_mse'])
  wall = r['wall_seconds_this_run']
  lines = [
      f'# {ds}, n={n}, {r["method"].upper()} ({r["backend"]})', '',
      f'Command: `{cmd}`', '', note, '',
      '| | ours | paper | authors\' notebooks |', '|---|---|---|---|',
      f'| teacher test acc | {pct(r["teacher_test_acc"])} | '
      f'{ours_paper.get("teacher", "–")} | {nb.get("teacher", "–")} |',
      f'| TCN test acc, before head fine-tuning | '
      f'{pct(r["tcn_test_acc_before_finetune"])} | – | – |',
      f'| TCN test acc, after head fine-tuning | '
      f'{pct(r["tcn_test_acc_after_finetune"])} | '
      f'{ours_paper.get("ff", {}).get(n, "–")} | '
      f'{nb.get("ff", {}).get(n, "–")} |',
      '', f'Per-student validation MSE: {mse}', '',
      f'Parameters: teacher {r["params"]["teacher"]:,}; students '
      f'{r["params"]["students_total"]:,} in all '
      f'({", ".join(f"{p:,}" for p in r["params"]["students_each"])}).', '',
      'Wall time of the run that finished it (s): ' +
      ', '.join(f'{k} {v:.0f}' for k, v in wall.items()) +
      '; training time per stage over all attempts (s): ' +
      ', '.join(f'{k} {v:.0f}' for k, v in r['train_seconds'].items()) + '.',
  ]
  with open(os.path.join(to, name + '.md'), 'w') as f:
    f.write('\n'.join(lines) + '\n')
  return lines


# ------------------------------------------------------------------- runs

def runs_table(out, cmd, paths):
  """Writes OUT (markdown): one row per results.json in `paths`."""
  rows = []
  for path in sorted(paths):
    with open(path) as f:
      r = json.load(f)
    ds, n, method = r['dataset'], r['num_students'], r['method']
    ref_paper = paper.TABLE3.get(ds, {}).get(method, {}).get(n)
    ref_nb = paper.NOTEBOOKS.get(ds, {}).get(method, {}).get(n)
    gan = r.get('gan') or {}
    label = method.upper() + (f' ({gan["mse_target"]})' if gan else '')
    mse = sum(r['student_val_mse']) / len(r['student_val_mse'])
    rows.append(
        f'| {os.path.splitext(os.path.basename(path))[0]} | {label} | {n} | '
        f'{100 * r["teacher_test_acc"]:.2f} | '
        f'{100 * r["tcn_test_acc_before_finetune"]:.2f} | '
        f'{100 * r["tcn_test_acc_after_finetune"]:.2f} | '
        f'{ref_paper or "–"} | {ref_nb or "–"} | {mse:.3f} | '
        f'{r["params"]["students_total"]:,} | '
        f'{r["train_seconds"]["students"]:.0f} |')
  lines = ['# Test accuracy (%) per configuration', '',
           f'Command: `{cmd}`', '',
           '| run | students | n | teacher | TCN before FT | TCN after FT | '
           'paper | authors\' notebooks | mean student val MSE | '
           'student params | student train s |',
           '|---|---|---|---|---|---|---|---|---|---|---|', *rows]
  with open(out, 'w') as f:
    f.write('\n'.join(lines) + '\n')
  return lines


# -------------------------------------------------------------------- CLI

def _parser():
  ap = argparse.ArgumentParser(
      prog='python -m experiments.tables',
      description=__doc__.split('\n\n')[0],
      formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog=__doc__.split('\n\n', 2)[2])
  sub = ap.add_subparsers(dest='cmd', required=True)
  p = sub.add_parser('paper', help="the paper's Fashion-MNIST tables and "
                     'plots from the results under ROOTs (the default)')
  p.add_argument('roots', nargs='+', help='directories to search')
  p.add_argument('--out', required=True, help='output directory')
  p.add_argument('--note', default='', help='a paragraph for the top of '
                 'the markdown (where and how the runs were made)')
  p = sub.add_parser('run', help="one run's results.json next to the paper")
  p.add_argument('workdir')
  p.add_argument('name', help='writes NAME.json and NAME.md')
  p.add_argument('command', help='the command that made the run')
  p.add_argument('note', nargs='?', default='')
  p.add_argument('--to', default=RESULTS,
                 help='output directory (default experiments/results)')
  p = sub.add_parser('runs', help='one row per results.json')
  p.add_argument('out', help='markdown file to write')
  p.add_argument('command', help='the command that made the runs')
  p.add_argument('paths', nargs='+', metavar='RESULTS.json')
  return ap


def main(argv=None):
  import sys  # pylint: disable=g-import-not-at-top
  argv = list(sys.argv[1:] if argv is None else argv)
  cmd = command(argv, 'experiments.tables')
  if argv and argv[0] not in COMMANDS and argv[0] not in ('-h', '--help'):
    argv = ['paper', *argv]   # `paper` is the default.
  args = _parser().parse_args(argv)
  if args.cmd == 'paper':
    lines = paper_tables(args.roots, args.out, args.note, cmd)
  elif args.cmd == 'run':
    lines = run_summary(args.workdir, args.name, args.command, args.note,
                        args.to)
  else:
    lines = runs_table(args.out, args.command, args.paths)
  print('\n'.join(lines))


if __name__ == '__main__':
  main()
