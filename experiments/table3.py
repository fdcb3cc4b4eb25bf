"""Table 3-style summary (test accuracy per method and n) from results.json files.

  python experiments/table3.py OUT.md "COMMAND THAT MADE THE RUNS" RESULTS.json...
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from summarize_run import NOTEBOOKS, PAPER  # pylint: disable=g-import-not-at-top

PAPER_GAN = {'fashion_mnist': {1: 89.35, 2: 90.74, 4: 89.49, 8: 90.67},
             'mnist': {1: 99.16, 2: 99.30, 4: 99.21, 8: 98.10}}
NOTEBOOKS_GAN = {'fashion_mnist': {1: 85.88, 2: 82.17, 4: 86.26, 8: 85.75},
                 'mnist': {1: 98.52, 2: 98.96, 4: 98.37, 8: None}}


def main(out, command, *paths):
  rows = []
  for path in sorted(paths):
    with open(path) as f:
      r = json.load(f)
    ds, n, method = r['dataset'], r['num_students'], r['method']
    if method == 'gan':
      paper, nb = PAPER_GAN[ds].get(n), NOTEBOOKS_GAN[ds].get(n)
    else:
      paper, nb = PAPER[ds]['ff'].get(n), NOTEBOOKS[ds]['ff'].get(n)
    gan = r.get('gan') or {}
    label = method.upper() + (f' ({gan["mse_target"]})' if gan else '')
    mse = sum(r['student_val_mse']) / len(r['student_val_mse'])
    rows.append(
        f'| {os.path.splitext(os.path.basename(path))[0]} | {label} | {n} | '
        f'{100 * r["teacher_test_acc"]:.2f} | '
        f'{100 * r["tcn_test_acc_before_finetune"]:.2f} | '
        f'{100 * r["tcn_test_acc_after_finetune"]:.2f} | {paper or "–"} | '
        f'{nb or "–"} | {mse:.3f} | {r["params"]["students_total"]:,} | '
        f'{r["train_seconds"]["students"]:.0f} |')
  lines = ['# Test accuracy (%) per configuration', '',
           f'Command: `{command}`', '',
           '| run | students | n | teacher | TCN before FT | TCN after FT | '
           'paper | authors\' notebooks | mean student val MSE | '
           'student params | student train s |',
           '|---|---|---|---|---|---|---|---|---|---|---|', *rows]
  with open(out, 'w') as f:
    f.write('\n'.join(lines) + '\n')
  print('\n'.join(lines))


if __name__ == '__main__':
  main(*sys.argv[1:])
