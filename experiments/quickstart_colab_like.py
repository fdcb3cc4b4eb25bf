"""The quickstart notebook, full size, in a fresh Colab-like environment.

A new venv without system site packages gets only `pip install` of this
checkout plus nbclient, ipykernel and matplotlib (what Colab has); the
notebook runs there top to bottom in an empty directory, as a user's would.
Writes <out>.json and <out>.md: final accuracies, wall time (install and
execution), the load average (the machine may be shared) and versions.

  python -m experiments.quickstart_colab_like \
      --out experiments/results/quickstart_colab_like
"""
import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, 'notebooks', 'quickstart.ipynb')
PACKAGES = ('jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'numpy',
            'tensorflow-datasets', 'nbclient', 'ipykernel', 'tqdm')
EXECUTE = '''
import json, os, sys, time, nbformat
from nbclient import NotebookClient
nb = nbformat.read(sys.argv[1], as_version=4)
t, load = time.time(), os.getloadavg()
NotebookClient(nb, timeout=4 * 3600, kernel_name='python3',
               resources={'metadata': {'path': '.'}}).execute()
nbformat.write(nb, 'executed.ipynb')
json.dump({'execute_seconds': time.time() - t, 'loadavg_start': load,
           'loadavg_end': os.getloadavg()}, open('timing.json', 'w'))
'''


def stdout(cell):
  return ''.join(o.get('text', '') for o in cell.get('outputs', [])
                 if o.get('output_type') == 'stream' and o['name'] == 'stdout')


def summarize(executed, timing, install_seconds, freeze):
  """The record: what the notebook printed, parsed, and how long it took."""
  import nbformat  # pylint: disable=g-import-not-at-top
  nb = nbformat.read(executed, 4)
  code = [c for c in nb.cells if c.cell_type == 'code']
  text = '\n'.join(stdout(c) for c in code)
  per_n = {}
  for m in re.finditer(
      r'n = (\d+): ([\d,]+) student parameters; test accuracy ([\d.]+) '
      r'before, ([\d.]+) after head fine-tuning \((\d+) s students, (\d+) s '
      r'head\)', text):
    per_n[m.group(1)] = dict(
        student_params=int(m.group(2).replace(',', '')),
        test_acc_before=float(m.group(3)), test_acc_after=float(m.group(4)),
        students_train_seconds=int(m.group(5)),
        head_train_seconds=int(m.group(6)))
  teacher = re.search(r'teacher: test accuracy ([\d.]+) after (\d+) epochs, '
                      r'(\d+) s of training', text)

  def seconds(cell):
    e = cell.metadata.get('execution', {})
    f = lambda s: datetime.datetime.fromisoformat(s.replace('Z', '+00:00'))
    return round((f(e['shell.execute_reply'])
                  - f(e['iopub.execute_input'])).total_seconds(), 1)

  return {
      'tcn_jax_from': stdout(code[1]).splitlines()[0],
      'teacher_test_acc': float(teacher.group(1)),
      'teacher_epochs': int(teacher.group(2)),
      'teacher_train_seconds': int(teacher.group(3)),
      'tcn': per_n, 'final_cell': stdout(code[-1]),
      'install_seconds': round(install_seconds, 1), **timing,
      'cell_seconds': [seconds(c) for c in code],
      'cpu_count': os.cpu_count(),
      'versions': {k: v for k, v in (line.split('==') for line in freeze
                                     if '==' in line)
                   if k.lower() in PACKAGES},
  }


def markdown(r, command):
  rows = '\n'.join(
      f"| {n} | {v['student_params']:,} | {100 * v['test_acc_before']:.2f} | "
      f"{100 * v['test_acc_after']:.2f} | {v['students_train_seconds']} | "
      f"{v['head_train_seconds']} |" for n, v in r['tcn'].items())
  return f'''# quickstart.ipynb, full size, in a fresh Colab-like venv

Command: `{command}`

A new venv (no system site packages), `pip install` of the checkout plus
nbclient, ipykernel and matplotlib; the notebook executed top to bottom in an
empty directory ({r['tcn_jax_from']}). {r['cpu_count']} CPU cores, load
average {r['loadavg_start'][0]:.1f} at the start and
{r['loadavg_end'][0]:.1f} at the end (a shared machine: other jobs ran).

Wall time: install {r['install_seconds'] / 60:.1f} min, notebook
{r['execute_seconds'] / 60:.1f} min.

Teacher: {100 * r['teacher_test_acc']:.2f}% test accuracy after
{r['teacher_epochs']} epochs ({r['teacher_train_seconds']} s of training).

| n | student params | TCN test acc, teacher's head (%) | after head fine-tuning (%) | students (s) | head (s) |
|---|---|---|---|---|---|
{rows}

Final cell:

```
{r['final_cell'].strip()}
```
'''


def run(venv):
  """Creates the venv, installs, executes; returns the run's directory."""
  if os.path.exists(venv):
    sys.exit(f'error: {venv} exists; the run needs a fresh venv')
  t = time.time()
  subprocess.check_call([sys.executable, '-m', 'venv', venv])
  python = os.path.join(venv, 'bin', 'python')
  subprocess.check_call([python, '-m', 'pip', 'install', '-q', '--upgrade',
                         'pip'])
  subprocess.check_call([python, '-m', 'pip', 'install', '-q', ROOT,
                         'nbclient', 'ipykernel', 'matplotlib'])
  run_dir = tempfile.mkdtemp(prefix='quickstart_colab_like_')
  with open(os.path.join(run_dir, 'install_seconds'), 'w') as f:
    f.write(str(time.time() - t))
  with open(os.path.join(run_dir, 'freeze.txt'), 'w') as f:
    subprocess.check_call([python, '-m', 'pip', 'freeze'], stdout=f)
  print('running the notebook in', run_dir, flush=True)
  subprocess.check_call([python, '-c', EXECUTE, NOTEBOOK], cwd=run_dir)
  return run_dir


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--out', required=True,
                      help='path prefix of the .json and .md written')
  parser.add_argument('--venv', default='/tmp/colabenv')
  parser.add_argument('--from_run', default='',
                      help='only summarize this finished run directory')
  args = parser.parse_args()
  run_dir = args.from_run or run(args.venv)
  read = lambda name: open(os.path.join(run_dir, name)).read()
  record = summarize(os.path.join(run_dir, 'executed.ipynb'),
                     json.loads(read('timing.json')),
                     float(read('install_seconds')), read('freeze.txt').split())
  record['command'] = ' '.join(['python', *sys.argv])
  with open(args.out + '.json', 'w') as f:
    json.dump(record, f, indent=1)
  with open(args.out + '.md', 'w') as f:
    f.write(markdown(record, record['command']))
  print(markdown(record, record['command']))


if __name__ == '__main__':
  main()
