"""experiments.tables on the committed results: Table 3 pools seeds into
mean ± std, marks cells that were not run, lists lever cells (FF and GAN)
apart from the paper-faithful ones, reads each run's config through the
resolved config, takes baselines from either grid layout, and regenerates
the committed tables and summaries unchanged."""
import contextlib
import glob
import importlib
import importlib.util
import json
import os
import shutil
import statistics

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
RESULTS = os.path.join(ROOT, 'experiments', 'results')


def experiments_module(name):
  """experiments.<name>: the package is the checkout's (not installed), so
  the repository root goes on the path when it is not there already."""
  with contextlib.ExitStack() as stack:
    if importlib.util.find_spec('experiments') is None:
      stack.enter_context(pytest.MonkeyPatch.context()).syspath_prepend(ROOT)
    return importlib.import_module(f'experiments.{name}')


@pytest.fixture(scope='module')
def mods():
  return {n: experiments_module(n)
          for n in ('common', 'paper', 'records', 'fmnist_tables', 'tables')}


def table3(mods, root):
  recs, skipped = mods['records'].load([root])
  assert recs and not skipped
  t = mods['fmnist_tables'].Tables(recs)
  t.table3()
  return {row['cell']: row for row in t.data['table3']}


def accuracies(root, cell, field):
  """The cell's accuracies over seeds, read from its results.json files."""
  out = []
  for path in sorted(glob.glob(os.path.join(root, 'seed*', cell,
                                            'results.json'))):
    with open(path) as f:
      r = json.load(f)
    out.append(r[field]['test_acc'] if field in ('kd', 'kdgan') else r[field])
  return out


def test_table3_pools_seeds(mods):
  root = os.path.join(RESULTS, 'gpu_h200_grid')
  rows = table3(mods, root)
  ff1 = accuracies(root, 'ff1', 'tcn_test_acc_after_finetune')
  kd4 = accuracies(root, 'kd4', 'kd')
  assert len(ff1) == len(kd4) == 2
  for label, values in (('TCN FF, n=1', ff1),
                        ('Hinton KD (student sized for n=4, 86.7k params)',
                         kd4)):
    ours = rows[label]['ours']
    assert ours['k'] == 2
    assert ours['mean'] == pytest.approx(statistics.mean(values))
    assert ours['std'] == pytest.approx(statistics.stdev(values))
  paper = mods['paper'].TABLE3['fashion_mnist']
  assert rows['TCN FF, n=1']['paper'] == paper['ff'][1]
  # Cells run on another machine, with that machine's teachers, pool in too.
  authors8 = accuracies(root, 'gan8_disc_reconstruction',
                        'tcn_test_acc_after_finetune')
  row = [v for k, v in rows.items() if 'authors' in k and k.endswith('n=8')]
  assert len(row) == 1 and row[0]['ours']['k'] == len(authors8) == 2
  assert row[0]['ours']['mean'] == pytest.approx(statistics.mean(authors8))


def test_table3_marks_cells_not_run(mods):
  rows = table3(mods, os.path.join(RESULTS, 'cpu_fmnist'))
  # GAN n = 8 was not run on the CPU: marked, not zero.
  not_run = [k for k in rows if k.startswith('TCN GAN, ') and
             'not in the paper' not in k and k.endswith('n=8')]
  assert len(not_run) == 2 and all(rows[k]['ours'] is None for k in not_run)
  assert rows['TCN FF, n=8']['ours']['k'] == 2


def test_table3_lists_gan_lever_cells_apart(mods):
  root = os.path.join(RESULTS, 'cpu_fmnist')
  rows = table3(mods, root)
  gan_levers = [k for k in rows if k.startswith("TCN GAN, paper's loss")
                and 'not in the paper' in k and k.endswith('n=1')]
  assert len(gan_levers) == 1
  row = rows[gan_levers[0]]
  value = accuracies(root, 'flip_control1_gan', 'tcn_test_acc_after_finetune')
  assert [os.path.basename(os.path.dirname(p)) for p in row['runs']] == [
      'flip_control1_gan'] * len(value)
  assert row['paper'] == mods['paper'].TABLE3['fashion_mnist']['gan'][1]
  assert row['ours']['mean'] == pytest.approx(statistics.mean(value))
  # The paper-faithful GAN n=1 cell does not pool the lever run in.
  faithful = rows["TCN GAN, paper's loss (MSE on the student output), n=1"]
  assert not any('flip_control1_gan' in p for p in faithful['runs'])


def _copy_cell(src, dst, edit=None, results_edit=None):
  """Copies a committed cell's results.json and config.json to dst,
  changing the config (and results) data with the given functions."""
  os.makedirs(dst)
  for name, fn in (('config.json', edit), ('results.json', results_edit)):
    with open(os.path.join(src, name)) as f:
      data = json.load(f)
    if fn:
      fn(data)
    with open(os.path.join(dst, name), 'w') as f:
      json.dump(data, f)


def test_adversarial_weight_is_a_lever_of_its_own(mods, tmp_path):
  src = os.path.join(RESULTS, 'cpu_fmnist', 'seed0', 'budget8_gan')
  _copy_cell(src, tmp_path / 'seed0' / 'budget8_gan')
  _copy_cell(src, tmp_path / 'seed0' / 'budget8_gan_adv01',
             lambda c: c['gan'].update(adv_weight=0.1))
  rows = table3(mods, str(tmp_path))
  gan8 = [k for k in rows if k.startswith('TCN GAN') and k.endswith('n=8')
          and 'slim students' in k]
  assert len(gan8) == 2
  assert sum('adversarial weight 0.1 (paper 1)' in k for k in gan8) == 1
  assert all(rows[k]['ours']['k'] == 1 for k in gan8)


def test_config_is_read_resolved(mods):
  """A committed (older, unresolved) config.json reads as the resolved
  config: per-n values chosen for its n, no *_by_n tables; a resolved one
  reads unchanged."""
  common = mods['common']
  path = os.path.join(RESULTS, 'cpu_fmnist', 'seed0', 'ff8', 'config.json')
  with open(path) as f:
    raw = json.load(f)
  assert raw['head']['epochs'] == -1 and 'epochs_by_n' in raw['head']
  cfg = common.read_config(path)
  assert cfg['head']['epochs'] == raw['head']['epochs_by_n']['8']
  assert cfg['head']['optimizer'] == raw['head']['optimizer_by_n']['8']
  assert cfg['students']['arch'] == raw['students']['arch_by_n']['8']
  assert not [k for s in cfg.values() if isinstance(s, dict) for k in s
              if k.endswith('_by_n')]
  assert common.resolve(cfg) == cfg
  # The tables take the run's epochs from it (Table 8: not marked *).
  recs, _ = mods['records'].load([os.path.dirname(path)])
  assert recs[0].epochs('head') == (cfg['head']['epochs'], True)


def test_baselines_from_either_layout(mods, tmp_path):
  """Baselines come from the run that carries them: a separate kd<n> workdir
  (older layout, its TCN the same as ff<n>'s) or ff<n> run with KD and
  KDGAN enabled; the TCN cell counts each run once either way."""
  src = os.path.join(RESULTS, 'gpu_h200_grid', 'seed0')
  with open(os.path.join(src, 'kd4', 'results.json')) as f:
    kd4 = json.load(f)
  with open(os.path.join(src, 'kdgan4', 'results.json')) as f:
    kdgan4 = json.load(f)

  def both(cfg):
    cfg['kd']['enabled'] = cfg['kdgan']['enabled'] = True

  def carries(r):
    r['kd'], r['kdgan'] = kd4['kd'], kdgan4['kdgan']

  _copy_cell(os.path.join(src, 'ff4'), tmp_path / 'new' / 'seed0' / 'ff4',
             both, carries)
  for name in ('ff4', 'kd4', 'kdgan4'):
    shutil.copytree(os.path.join(src, name), tmp_path / 'old' / 'seed0' / name)
  kd_label = 'Hinton KD (student sized for n=4, 86.7k params)'
  for layout in ('new', 'old'):
    rows = table3(mods, str(tmp_path / layout))
    assert rows[kd_label]['ours']['values'] == [kd4['kd']['test_acc']]
    kdgan = [v for k, v in rows.items() if k.startswith('KDGAN') and
             'n=4' in k][0]
    assert kdgan['ours']['values'] == [kdgan4['kdgan']['test_acc']]
    assert rows['TCN FF, n=4']['ours']['k'] == 1


def test_committed_tables_regenerate_unchanged(mods, tmp_path):
  """The H200 tables from their committed results: the same markdown and
  JSON as committed, but for the command line."""
  results = mods['common'].RESULTS   # Source paths are shown relative to it.
  committed = os.path.join(results, 'tables_gpu_h200')
  with open(os.path.join(committed, 'tables.json')) as f:
    old = json.load(f)
  with open(os.path.join(committed, 'tables.md')) as f:
    old_md = f.read().split('\n')
  note = old_md[4]
  mods['tables'].paper_tables(
      [os.path.join(results, 'gpu_h200_fmnist')], str(tmp_path), note,
      old['command'])
  with open(tmp_path / 'tables.md') as f:
    assert f.read().split('\n') == old_md
  with open(tmp_path / 'tables.json') as f:
    assert json.load(f) == old
  assert sorted(os.listdir(tmp_path)) == sorted(
      ['tables.md', 'tables.json', *old['plots']])


def test_run_and_runs_regenerate_the_committed_summaries(mods, tmp_path):
  tables = mods['tables']
  name = 'fashion_mnist_default_cpu'
  with open(os.path.join(RESULTS, name + '.md')) as f:
    md = f.read()
  lines = md.split('\n')
  workdir = tmp_path / 'run'
  workdir.mkdir()
  shutil.copy(os.path.join(RESULTS, name + '.json'), workdir / 'results.json')
  tables.main(['run', str(workdir), name, lines[2][len('Command: `'):-1],
               lines[4], '--to', str(tmp_path / 'out')])
  assert (tmp_path / 'out' / (name + '.md')).read_text() == md
  # `runs`: the committed table (the README adds notes below it).
  readme = os.path.join(RESULTS, 'gpu_h200_fmnist', 'README.md')
  with open(readme) as f:
    committed = f.read()
  cmd = committed.split('\n')[2][len('Command: `'):-1]
  tables.main(['runs', str(tmp_path / 'runs.md'), cmd,
               *glob.glob(os.path.join(RESULTS, 'gpu_h200_fmnist', '*.json'))])
  assert committed.startswith((tmp_path / 'runs.md').read_text())
