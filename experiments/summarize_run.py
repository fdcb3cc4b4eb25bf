"""Copies a run's results.json under experiments/results/ with a markdown summary.

  python experiments/summarize_run.py WORKDIR NAME "COMMAND THAT MADE IT" [NOTE]
"""
import json
import os
import shutil
import sys

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results')

# Paper (Table 3, F-MNIST) and the authors' notebooks (reference Sec. 7a).
PAPER = {'fashion_mnist': {'teacher': 91.98, 'ff': {1: 89.97, 2: 89.43,
                                                     4: 86.54, 8: 82.33}},
         'mnist': {'teacher': 98.11, 'ff': {1: 98.65, 2: 96.79, 4: 97.81,
                                            8: 93.97}}}
NOTEBOOKS = {'fashion_mnist': {'teacher': 92.39, 'ff': {1: 86.29, 2: 80.12,
                                                         4: 85.27, 8: 86.15}},
             'mnist': {'teacher': 98.99, 'ff': {1: 98.90, 2: 98.48, 4: 98.42,
                                                8: 98.99}}}


def main(workdir, name, command, note=''):
  with open(os.path.join(workdir, 'results.json')) as f:
    r = json.load(f)
  os.makedirs(RESULTS, exist_ok=True)
  shutil.copy(os.path.join(workdir, 'results.json'),
              os.path.join(RESULTS, name + '.json'))
  ds, n = r['dataset'], r['num_students']
  paper, nb = PAPER.get(ds, {}), NOTEBOOKS.get(ds, {})
  pct = lambda v: f'{100 * v:.2f}'
  mse = ', '.join(f'{v:.4f}' for v in r['student_val_mse'])
  wall = r['wall_seconds_this_run']
  lines = [
      f'# {ds}, n={n}, {r["method"].upper()} ({r["backend"]})', '',
      f'Command: `{command}`', '', note, '',
      '| | ours | paper | authors\' notebooks |', '|---|---|---|---|',
      f'| teacher test acc | {pct(r["teacher_test_acc"])} | '
      f'{paper.get("teacher", "–")} | {nb.get("teacher", "–")} |',
      f'| TCN test acc, before head fine-tuning | '
      f'{pct(r["tcn_test_acc_before_finetune"])} | – | – |',
      f'| TCN test acc, after head fine-tuning | '
      f'{pct(r["tcn_test_acc_after_finetune"])} | '
      f'{paper.get("ff", {}).get(n, "–")} | {nb.get("ff", {}).get(n, "–")} |',
      '', f'Per-student validation MSE: {mse}', '',
      f'Parameters: teacher {r["params"]["teacher"]:,}; students '
      f'{r["params"]["students_total"]:,} in all '
      f'({", ".join(f"{p:,}" for p in r["params"]["students_each"])}).', '',
      'Wall time of the run that finished it (s): ' +
      ', '.join(f'{k} {v:.0f}' for k, v in wall.items()) +
      '; training time per stage over all attempts (s): ' +
      ', '.join(f'{k} {v:.0f}' for k, v in r['train_seconds'].items()) + '.',
  ]
  with open(os.path.join(RESULTS, name + '.md'), 'w') as f:
    f.write('\n'.join(lines) + '\n')
  print('\n'.join(lines))


if __name__ == '__main__':
  main(*sys.argv[1:])
