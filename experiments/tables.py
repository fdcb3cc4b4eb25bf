"""The paper's Fashion-MNIST tables (3, 1, 2, 4, 8 and a chunking study) from
results.json files, next to the paper's and the authors' notebooks' numbers.

  python experiments/tables.py ROOT [ROOT ...] --out experiments/results/tables_NAME

Reads every results.json under the roots (a workdir's, named after its
directory, with the config.json beside it when there is one), and every
other *.json there that is a results.json copy (named after the file, e.g.
experiments/results/gpu_h200_fmnist/ff4.json). Runs with the same
configuration are pooled: mean ± sample std over the distinct runs
(distinct = different seed or different parameters digest). Writes
OUT/tables.md, OUT/tables.json and three plots (OUT/acc_vs_n.png,
OUT/acc_vs_params.png, OUT/student_mse.png).

Older results.json files lack some fields: without 'gan' the GAN loss is
read from the file name (student_output / disc_reconstruction), without
'chunking' the chunks are contiguous, without 'kd' / 'kdgan' there is no
baseline. Without a config.json beside a result, epochs are those of the
current configs/fashion_mnist.py (marked *).
"""
import argparse
import collections
import functools
import importlib.util
import json
import math
import os
import shlex
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NS = (1, 2, 4, 8)
PRUNE = {'teacher', 'students', 'head', 'kd', 'kdgan', 'tcn', 'tensorboard'}
NOT_RUN = '— (not run)'

# Paper (Table 3, F-MNIST row) and the authors' notebooks (reference notes
# Sec. 7a). The paper has no KDGAN number for F-MNIST and one KD student
# (94.65k parameters, Table 6) for all n; the notebooks have no baselines.
PAPER = {'teacher': 91.98, 'kd': 82.87, 'kdgan': None,
         'ff': {1: 89.97, 2: 89.43, 4: 86.54, 8: 82.33},
         'gan': {1: 89.35, 2: 90.74, 4: 89.49, 8: 90.67}}
NOTEBOOKS = {'teacher': 92.39, 'kd': None, 'kdgan': None,
             'ff': {1: 86.29, 2: 80.12, 4: 85.27, 8: 86.15},
             'gan': {1: 85.88, 2: 82.17, 4: 86.26, 8: 85.75}}
# Table 1 (n=4 per-student MSE) and the notebooks' FF MSE (notes Sec. 7b).
PAPER_T1 = {'ff': [.157, .176, .173, .174], 'gan': [.546, .704, .58, .546]}
NOTEBOOK_MSE = {1: [.1668], 2: [.2457, .2736], 4: [.2079, .2580, .2426, .2607],
                8: [.2147, .2370, .2443, .2651, .2495, .2533, .2450, .2467]}
PAPER_T2 = (85.70, 86.54)
# Table 4, F-MNIST: identical students (22.17k each) and improved ones (†).
# The printed sums (parameters: 88.68k, 278.39k) are kept as printed;
# 22.17k + 3 x 85.74k is 279.39k.
PAPER_T4 = {'identical': ([.1571, .1759, .1728, .1743], [22170] * 4,
                          .6801, 88680),
            'improved': ([.1571, .1293, .1112, .1131],
                         [22170, 85740, 85740, 85740], .5107, 278390)}
# Table 8, F-MNIST rows (probably n = 1, 4, 8; labels lost): epochs,
# s/epoch, total s, per student (notes Sec. 7c).
PAPER_T8 = {'ff': {1: (10, 4, 40), 4: (10, 3.5, 35), 8: (10, 3, 30)},
            'gan': {1: (55, 13, 715), 4: (55, 13, 715), 8: (50, 13, 650)}}

GAN_LABEL = {'student_output': "GAN, paper's loss (MSE on the student output)",
             'disc_reconstruction': "GAN, authors' code's loss (MSE through "
                                    "D's reconstruction head)",
             'unknown': 'GAN, loss not recorded'}


# ----------------------------------------------------------------- loading

_SHORT = (('logit matching x1 at T=2', 'logit'), ('cosine LR', 'cos LR'),
          ('BatchNorm in students', 'BN'),
          ('48-unit instead of 16-unit bottleneck', 'wide'),
          ('mirrored images added (flip)', 'flip'),
          ('slim students (eight within 100k)', 'slim'),
          ('pca (balanced) chunks', 'PCA'))


def _short(variant):
  """A lever list short enough for a plot legend."""
  for long, short in _SHORT:
    variant = variant.replace(long, short)
  return variant


def _show(path):
  """A path relative to the repository, or absolute outside it."""
  rel = os.path.relpath(os.path.abspath(path), REPO)
  return os.path.abspath(path) if rel.startswith('..') else rel


@functools.cache
def _config_module():
  path = os.path.join(REPO, 'configs', 'fashion_mnist.py')
  spec = importlib.util.spec_from_file_location('fmnist_config', path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


@functools.cache
def _load_config(preset=''):
  """The current config with `preset`, as plain data (shared: read only)."""
  return json.loads(_config_module().get_config(preset).to_json())


def per_n(cfg, section, field, n):
  """A config value, or the paper's per-n one where it is ''/-1."""
  value = cfg[section][field]
  if value in ('', -1, -1.0, None):
    return cfg[section].get(field + '_by_n', {}).get(str(n), value)
  return value


class Rec:
  """One results.json, normalised."""

  def __init__(self, path, root, r, cfg):
    self.path, self.root, self.r, self.cfg = path, root, r, cfg
    base = os.path.basename(path)
    self.name = (os.path.basename(os.path.dirname(path))
                 if base == 'results.json' else os.path.splitext(base)[0])
    self.n = r['num_students']
    self.seed = r.get('seed')
    self.method = r.get('method', 'ff')
    self.target = None
    if self.method == 'gan':
      gan = r.get('gan') or {}
      self.target = gan.get('mse_target') or next(
          (t for t in ('disc_reconstruction', 'student_output')
           if t in self.name), 'unknown')
    chunking = r.get('chunking') or 'contiguous'
    self.chunking = chunking
    each = r['params']['students_each']
    arch = ((cfg or {}).get('students') or {}).get('arch', '')
    self.hetero = '|' in str(arch) or len(set(each)) > 1
    # Levers that are not in the paper ('' = paper-faithful students).
    st = (cfg or {}).get('students') or {}
    levers = []
    if st.get('logit_weight'):
      levers.append(f'logit matching x{st["logit_weight"]:g} at '
                    f'T={st.get("logit_temperature", 2.0):g}')
    if st.get('lr_schedule', 'constant') != 'constant':
      levers.append(f'{st["lr_schedule"]} LR')
    arch = str(st.get('arch') or per_n(cfg, 'students', 'arch', self.n)
               if cfg else '')
    if ' BN' in arch:
      levers.append('BatchNorm in students')
    mod = _config_module()
    for spec, lever in ((mod.WIDE_FMNIST,
                         '48-unit instead of 16-unit bottleneck'),
                        (mod.SLIM_FMNIST_8, 'slim students (eight within 100k)')):
      if arch in (spec, mod.with_batchnorm(spec)):
        levers.append(lever)
    if st.get('augment'):
      levers.append('mirrored images added (flip)')
    if cfg:   # Another adversarial weight or schedule than the paper's.
      paper = _load_config('gan' if self.method == 'gan' else '')
      adv_paper = paper['gan']['adv_weight']
      adv = (cfg.get('gan') or {}).get('adv_weight', adv_paper)
      if self.method == 'gan' and adv != adv_paper:
        levers.append(f'adversarial weight {adv:g} (paper {adv_paper:g})')
      for stage in ('students', 'head'):
        ours, theirs = (per_n(c, stage, 'epochs', self.n) for c in (cfg, paper))
        if ours != theirs:
          levers.append(f'{ours} {stage} epochs (paper {theirs})')
    if levers and chunking != 'contiguous':
      levers.append(f'{chunking} chunks')
    self.variant = ', '.join(levers)
    self.subset = bool(cfg and (cfg['data'].get('train_size') or
                                cfg['data'].get('test_size')))
    digests = r.get('digests') or {}
    self.teacher_digest = digests.get('teacher', path)
    self.tcn_digest = digests.get('tcn', path)
    self.backend = r.get('backend', '?')

  @property
  def key(self):
    """The TCN configuration (runs with one key are pooled). A cell with
    levers lists its chunking among them (the lever rows and plots take
    every chunking; the chunking study compares paper-faithful students)."""
    chunking = 'contiguous' if self.variant else self.chunking
    return (self.method, self.target, self.n, chunking, self.hetero,
            self.variant)

  def epochs(self, stage):
    """(epochs, from this run's config.json?) of 'students'/'head'/..."""
    cfg, own = self.cfg, True
    if cfg is None:
      cfg, own = _load_config('gan' if self.method == 'gan' else ''), False
    if stage in ('kd', 'kdgan'):
      return cfg[stage]['epochs'], own
    return per_n(cfg, stage, 'epochs', self.n), own


def load(roots):
  recs, skipped = [], []
  for root in roots:
    for dirpath, dirs, files in os.walk(root):
      dirs[:] = sorted(d for d in dirs if d not in PRUNE)
      for f in sorted(files):
        if not f.endswith('.json') or f == 'config.json':
          continue
        path = os.path.join(dirpath, f)
        try:
          with open(path) as fh:
            r = json.load(fh)
        except (OSError, ValueError):
          continue
        if not isinstance(r, dict) or 'tcn_test_acc_after_finetune' not in r:
          continue
        if r.get('dataset') != 'fashion_mnist':
          skipped.append(f'{path} (dataset {r.get("dataset")})')
          continue
        cfg = None
        cpath = os.path.join(dirpath, 'config.json')
        if f == 'results.json' and os.path.isfile(cpath):
          with open(cpath) as fh:
            cfg = json.load(fh)
        recs.append(Rec(path, root, r, cfg))
  return recs, skipped


def unique(recs, key):
  """recs without repeats of key(rec) (the same run reached twice, e.g. a
  kd<n> workdir that copied ff<n>'s students)."""
  seen, out = set(), []
  for r in recs:
    k = key(r)
    if k not in seen:
      seen.add(k)
      out.append(r)
  return out


# ------------------------------------------------------------------- stats

def stats(values):
  vals = [v for v in values if v is not None]
  if not vals:
    return None
  mean = sum(vals) / len(vals)
  std = (math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1))
         if len(vals) > 1 else None)
  return {'mean': mean, 'std': std, 'k': len(vals), 'values': vals}


def fmt(s, digits=2, scale=1.0):
  if s is None:
    return NOT_RUN
  m = f'{scale * s["mean"]:.{digits}f}'
  if s['std'] is not None:
    m += f' ± {scale * s["std"]:.{digits}f}'
  return m + (f' ({s["k"]} runs)' if s['k'] > 1 else '')


def delta(s, ref, scale=100.0):
  if s is None or ref is None:
    return '—'
  return f'{scale * s["mean"] - ref:+.2f}'


def ref(v):
  return '–' if v is None else f'{v:.2f}'


# ----------------------------------------------------------------- tables

class Tables:
  """Builds every table as markdown lines plus a JSON-able dict."""

  def __init__(self, recs):
    self.recs = recs
    self.tcn = collections.defaultdict(list)
    for r in unique(recs, lambda r: (r.key, r.seed, r.tcn_digest)):
      self.tcn[r.key].append(r)
    self.teachers = unique(recs, lambda r: r.teacher_digest)
    self.base = {}
    for stage in ('kd', 'kdgan'):
      rs = unique([r for r in recs if r.r.get(stage)],
                  lambda r: (r.n, r.seed, r.teacher_digest))
      self.base[stage] = {n: [r for r in rs if r.n == n] for n in NS}
    self.md, self.data = [], {}

  def cell(self, key, field='tcn_test_acc_after_finetune'):
    return stats([r.r[field] for r in self.tcn.get(key, [])])

  def baseline(self, stage, n, field='test_acc'):
    return stats([r.r[stage][field] for r in self.base[stage][n]])

  def levers(self):
    """(method, GAN target or None, levers) of the cells not in the paper."""
    return sorted({(k[0], k[1], k[5]) for k in self.tcn if k[5]},
                  key=lambda m: (m[0], m[1] or '', m[2]))

  @staticmethod
  def key(method, n, target=None, chunking='contiguous', hetero=False,
          variant=''):
    return (method, target if method == 'gan' else None, n, chunking, hetero,
            variant)

  # Table 3 ---------------------------------------------------------------
  def table3(self):
    rows = []   # (label, stats, paper, notebooks, runs)
    t = stats([r.r['teacher_test_acc'] for r in self.teachers])
    rows.append(('Teacher', t, PAPER['teacher'], NOTEBOOKS['teacher'],
                 self.teachers))
    for stage, label in (('kd', 'Hinton KD'), ('kdgan', 'KDGAN')):
      for n in NS:
        s = self.baseline(stage, n)
        params = [r.r[stage]['params'] for r in self.base[stage][n]]
        size = f', {params[0] / 1e3:.1f}k params' if params else ''
        rows.append((f'{label} (student sized for n={n}{size})', s,
                     PAPER[stage], NOTEBOOKS[stage], self.base[stage][n]))
    for method, target in (('ff', None), ('gan', 'student_output'),
                           ('gan', 'disc_reconstruction'), ('gan', 'unknown')):
      label = 'TCN FF' if method == 'ff' else 'TCN ' + GAN_LABEL[target]
      for n in NS:
        k = self.key(method, n, target)
        if target == 'unknown' and k not in self.tcn:
          continue
        rows.append((f'{label}, n={n}', self.cell(k), PAPER[method][n],
                     NOTEBOOKS[method][n], self.tcn.get(k, [])))
    for method, target, variant in self.levers():
      label = 'TCN FF' if method == 'ff' else 'TCN ' + GAN_LABEL[target]
      for n in NS:
        k = self.key(method, n, target, variant=variant)
        if k in self.tcn:
          rows.append((f'{label} + {variant} (not in the paper), n={n}',
                       self.cell(k), PAPER[method][n], NOTEBOOKS[method][n],
                       self.tcn[k]))
    md = ['## Table 3: test accuracy (%) after head fine-tuning', '',
          'Mean ± sample std over runs (one run: the value alone). Δ = ours '
          '− the reference, in points. Paper: Table 3, F-MNIST row; '
          'notebooks: the authors\' released code (reference notes Sec. '
          '7a), whose GAN students use the disc_reconstruction loss. The '
          'paper reports one KD student (94.65k parameters) for all n and no '
          'KDGAN number for F-MNIST (–); the notebooks have no baselines.',
          '', '| cell | ours | paper | Δ paper | notebooks | Δ notebooks | '
          'runs |', '|---|---|---|---|---|---|---|']
    data = []
    for label, s, p, nb, runs in rows:
      names = ', '.join(sorted({r.name for r in runs})) or '—'
      if label == 'Teacher' and runs:
        names = (f'{len(runs)} teacher(s) (distinct digests), shared by '
                 f'{len(self.recs)} result files')
      md.append(f'| {label} | {fmt(s, scale=100)} | {ref(p)} | '
                f'{delta(s, p)} | {ref(nb)} | {delta(s, nb)} | {names} |')
      data.append(dict(cell=label, ours=s, paper=p, notebooks=nb,
                       runs=[_show(r.path) for r in runs]))
    # The paper's own layout (one row per source).
    head = ['T', 'KD', 'KDGAN'] + [f'n={n} {m}' for n in NS
                                   for m in ('FF', 'GAN')]
    md += ['', 'In the paper\'s layout (ours: KD and KDGAN sized for n=4, '
           '86.7k parameters, the closest to the paper\'s 94.65k KD '
           'student):', '', '| | ' + ' | '.join(head) + ' |',
           '|---' * (len(head) + 1) + '|']

    def short(s):
      return '—' if s is None else f'{100 * s["mean"]:.2f}'
    for label, target in (("ours, GAN = paper's loss", 'student_output'),
                          ("ours, GAN = authors' code's loss",
                           'disc_reconstruction')):
      cells = [short(t), short(self.baseline('kd', 4)),
               short(self.baseline('kdgan', 4))]
      for n in NS:
        cells += [short(self.cell(self.key('ff', n))),
                  short(self.cell(self.key('gan', n, target)))]
      md.append(f'| {label} | ' + ' | '.join(cells) + ' |')
    for label, src in (('paper', PAPER), ("authors' notebooks", NOTEBOOKS)):
      cells = [ref(src['teacher']), ref(src['kd']), ref(src['kdgan'])]
      for n in NS:
        cells += [ref(src['ff'][n]), ref(src['gan'][n])]
      md.append(f'| {label} | ' + ' | '.join(cells) + ' |')
    self.md += md + ['']
    self.data['table3'] = data

  # Table 1 ---------------------------------------------------------------
  def table1(self):
    md = ['## Table 1: per-student validation MSE, n = 4', '',
          'MSE of each student\'s output to its chunk of the teacher\'s '
          'feature on the validation split (mean ± std over runs). With the '
          'disc_reconstruction loss the students never see their chunk '
          'directly, so their own MSE is large.', '',
          '| students | s1 | s2 | s3 | s4 | sum | runs |',
          '|---|---|---|---|---|---|---|']
    data = {}
    for label, k, paper in (
        ('ours, FF', self.key('ff', 4), None),
        ('ours, ' + GAN_LABEL['student_output'],
         self.key('gan', 4, 'student_output'), None),
        ('ours, ' + GAN_LABEL['disc_reconstruction'],
         self.key('gan', 4, 'disc_reconstruction'), None)):
      runs = self.tcn.get(k, [])
      per = [stats([r.r['student_val_mse'][i] for r in runs])
             for i in range(4)]
      tot = stats([sum(r.r['student_val_mse']) for r in runs])
      md.append(f'| {label} | ' + ' | '.join(fmt(s, 3) for s in per) +
                f' | {fmt(tot, 3)} | {len(runs)} |')
      data[label] = {'per_student': per, 'sum': tot}
    md.append('| paper, MSE (FF) | ' + ' | '.join(
        f'{v:.3f}' for v in PAPER_T1['ff']) + f' | {sum(PAPER_T1["ff"]):.3f}'
              ' | – |')
    md.append('| paper, MSE + GAN | ' + ' | '.join(
        f'{v:.3f}' for v in PAPER_T1['gan']) +
              f' | {sum(PAPER_T1["gan"]):.3f} | – |')
    md.append("| authors' notebooks, FF | " + ' | '.join(
        f'{v:.3f}' for v in NOTEBOOK_MSE[4]) +
              f' | {sum(NOTEBOOK_MSE[4]):.3f} | – |')
    md += ['', 'FF students for every n (per-student validation MSE, mean '
           'over runs, s1 … sn; notebooks: reference notes Sec. 7b):', '',
           '| n | ours | mean | notebooks | mean |', '|---|---|---|---|---|']
    for n in NS:
      runs = self.tcn.get(self.key('ff', n), [])
      if runs:
        per = [sum(r.r['student_val_mse'][i] for r in runs) / len(runs)
               for i in range(n)]
        ours, mean = ' '.join(f'{v:.3f}' for v in per), f'{sum(per) / n:.3f}'
      else:
        ours, mean = NOT_RUN, '—'
      nb = NOTEBOOK_MSE[n]
      md.append(f'| {n} | {ours} | {mean} | '
                f'{" ".join(f"{v:.3f}" for v in nb)} | '
                f'{sum(nb) / len(nb):.3f} |')
    self.md += md + ['']
    self.data['table1'] = data

  # Table 2 ---------------------------------------------------------------
  def table2(self):
    md = ['## Table 2: head fine-tuning, test accuracy (%) before → after',
          '', 'The paper reports n = 4 FF only; the other rows are ours.', '',
          '| configuration | before | after | gain | paper before | '
          'paper after |', '|---|---|---|---|---|---|']
    data = []
    keys = sorted(self.tcn, key=lambda k: (k[3], k[4], k[5], k[0], str(k[1]), k[2]))
    k4 = self.key('ff', 4)
    if k4 not in keys:
      keys.insert(0, k4)
    for k in keys:
      b = self.cell(k, 'tcn_test_acc_before_finetune')
      a = self.cell(k)
      gain = stats([r.r['tcn_test_acc_after_finetune'] -
                    r.r['tcn_test_acc_before_finetune']
                    for r in self.tcn.get(k, [])])
      paper = PAPER_T2 if k == k4 else (None, None)
      g = '—' if gain is None else f'{100 * gain["mean"]:+.2f}'
      md.append(f'| {self.label(k)} | {fmt(b, scale=100)} | '
                f'{fmt(a, scale=100)} | {g} | '
                f'{ref(paper[0])} | {ref(paper[1])} |')
      data.append(dict(config=self.label(k), before=b, after=a, gain=gain,
                       paper=paper))
    self.md += md + ['']
    self.data['table2'] = data

  def label(self, k):
    method, target, n, chunking, hetero, variant = k
    s = 'FF' if method == 'ff' else GAN_LABEL[target]
    if variant:
      s += f' + {variant}'
    s += f', n={n}'
    if chunking != 'contiguous':
      s += f', {chunking} chunks'
    if hetero:
      s += ', heterogeneous students'
    return s

  # Table 4 ---------------------------------------------------------------
  def table4(self):
    md = ['## Table 4: identical vs heterogeneous students, n = 4 (FF)', '',
          '| students | s1 MSE (params) | s2 | s3 | s4 | sum (params) | '
          'runs |', '|---|---|---|---|---|---|---|']
    data = {}

    def row(label, runs):
      if not runs:
        return f'| {label} | ' + ' | '.join([NOT_RUN] * 5) + ' | 0 |'
      cells = []
      for i in range(4):
        s = stats([r.r['student_val_mse'][i] for r in runs])
        p = runs[0].r['params']['students_each'][i]
        cells.append(f'{fmt(s, 4)} ({p / 1e3:.2f}k)')
      tot = stats([sum(r.r['student_val_mse']) for r in runs])
      p = runs[0].r['params']['students_total']
      data[label] = dict(per_student=[r.r['student_val_mse'] for r in runs],
                         params=runs[0].r['params']['students_each'])
      return (f'| {label} | ' + ' | '.join(cells) +
              f' | {fmt(tot, 4)} ({p / 1e3:.2f}k) | {len(runs)} |')

    md.append(row('ours, identical', self.tcn.get(self.key('ff', 4), [])))
    hetero = [r for k, rs in self.tcn.items() for r in rs
              if k[0] == 'ff' and k[2] == 4 and k[4] and not k[5]]
    md.append(row('ours, heterogeneous', hetero))
    for label, (mse, params, tot, ptot) in (
        ('paper, identical', PAPER_T4['identical']),
        ('paper, improved †', PAPER_T4['improved'])):
      md.append(f'| {label} | ' + ' | '.join(
          f'{m:.4f} ({p / 1e3:.2f}k)' for m, p in zip(mse, params)) +
                f' | {tot:.4f} ({ptot / 1e3:.2f}k, as printed) | – |')
    if not hetero:
      md += ['', 'No heterogeneous-student run (`--config.students.arch` '
             "with four '|'-separated architectures) was found under the "
             'roots: none has been run. The paper gives no architecture for '
             'its improved 85.74k students ("increasing model depth").']
    self.md += md + ['']
    self.data['table4'] = data

  # Table 8 ---------------------------------------------------------------
  def table8(self):
    md = ['## Table 8: training epochs and seconds', '',
          'Training seconds from results.json `train_seconds` (per stage, '
          'all attempts, including each epoch\'s validation pass); s/epoch = '
          'seconds / epochs. Ours train all n students in one program, so '
          'the students\' seconds are for all n together; the paper\'s '
          'totals are per student (rows probably n = 1, 4, 8; notes Sec. '
          '7c). Epochs marked * come from the current '
          'configs/fashion_mnist.py (no config.json beside that result).', '',
          '| configuration | backend | student epochs | s/epoch (all '
          'students) | students total s | head epochs, s | paper per '
          'student: epochs, s/epoch, total s |',
          '|---|---|---|---|---|---|---|']
    data = []
    for k in sorted(self.tcn, key=lambda k: (k[3], k[4], k[5], k[0],
                                             str(k[1]), k[2])):
      runs = self.tcn[k]
      ep, own = runs[0].epochs('students')
      hep, hown = runs[0].epochs('head')
      secs = stats([r.r['train_seconds']['students'] for r in runs])
      hsecs = stats([r.r['train_seconds']['head'] for r in runs])
      per = stats([r.r['train_seconds']['students'] / ep for r in runs])
      p = (PAPER_T8.get(k[0], {}).get(k[2])
           if k[3] == 'contiguous' and not k[4] else None)
      backends = '/'.join(sorted({r.backend for r in runs}))
      md.append(f'| {self.label(k)} | {backends} | {ep}{"" if own else "*"} |'
                f' {fmt(per, 2)} | {fmt(secs, 1)} | '
                f'{hep}{"" if hown else "*"}, {fmt(hsecs, 1)} | '
                f'{"–" if p is None else ", ".join(map(str, p))} |')
      data.append(dict(config=self.label(k), student_epochs=ep,
                       seconds_per_epoch=per, students_seconds=secs,
                       head_epochs=hep, head_seconds=hsecs, paper=p))
    md += ['', '| other stages | backend | epochs | s/epoch | total s |',
           '|---|---|---|---|---|']
    t_ep, t_own = (self.teachers[0].epochs('teacher') if self.teachers
                   else (None, True))
    if self.teachers:
      ts = stats([r.r['train_seconds']['teacher'] for r in self.teachers])
      md.append(f'| teacher | {"/".join(sorted({r.backend for r in self.teachers}))}'
                f' | {t_ep}{"" if t_own else "*"} | '
                f'{fmt(stats([r.r["train_seconds"]["teacher"] / t_ep for r in self.teachers]), 2)}'
                f' | {fmt(ts, 1)} |')
      data.append(dict(config='teacher', epochs=t_ep, seconds=ts))
    for stage, label in (('kd', 'Hinton KD'), ('kdgan', 'KDGAN')):
      for n in NS:
        runs = self.base[stage][n]
        if not runs:
          md.append(f'| {label}, n={n} | — | — | — | {NOT_RUN} |')
          continue
        ep, own = runs[0].epochs(stage)
        s = stats([r.r[stage]['train_seconds'] for r in runs])
        md.append(f'| {label}, n={n} | '
                  f'{"/".join(sorted({r.backend for r in runs}))} | '
                  f'{ep}{"" if own else "*"} | '
                  f'{fmt(stats([r.r[stage]["train_seconds"] / ep for r in runs]), 2)}'
                  f' | {fmt(s, 1)} |')
        data.append(dict(config=f'{label}, n={n}', epochs=ep, seconds=s))
    self.md += md + ['']
    self.data['table8'] = data

  # Chunking --------------------------------------------------------------
  def chunking(self):
    md = ['## Chunking study (FF, n = 4 and 8): contiguous slices vs PCA '
          'coefficients', '',
          'PCA chunks: students regress chunks of the teacher feature\'s '
          'principal-component coefficients, in variance order (ordered) '
          'or with about equal variance each (balanced). Their MSE is in '
          'coefficient space (per coefficient), not comparable one-to-one '
          'with the contiguous students\' MSE.', '',
          '| n | chunks | test acc before FT | after FT | mean student MSE | '
          'runs |', '|---|---|---|---|---|---|']
    data = []
    for n in (4, 8):
      for chunking in ('contiguous', 'pca (ordered)', 'pca (balanced)'):
        k = self.key('ff', n, chunking=chunking)
        runs = self.tcn.get(k, [])
        b = self.cell(k, 'tcn_test_acc_before_finetune')
        a = self.cell(k)
        mse = stats([sum(r.r['student_val_mse']) / n for r in runs])
        md.append(f'| {n} | {chunking} | {fmt(b, scale=100)} | '
                  f'{fmt(a, scale=100)} | {fmt(mse, 3)} | {len(runs)} |')
        data.append(dict(n=n, chunking=chunking, before=b, after=a, mse=mse))
    self.md += md + ['']
    self.data['chunking'] = data

  # Plots -----------------------------------------------------------------
  def plots(self, out):
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
    files = []
    series = [('TCN FF', lambda n: self.cell(self.key('ff', n)), 'C0', 'o'),
              ("TCN GAN (paper's loss)", lambda n: self.cell(
                  self.key('gan', n, 'student_output')), 'C1', 's'),
              ("TCN GAN (authors' loss)", lambda n: self.cell(
                  self.key('gan', n, 'disc_reconstruction')), 'C2', '^'),
              ('Hinton KD', lambda n: self.baseline('kd', n), 'C3', 'D'),
              ('KDGAN', lambda n: self.baseline('kdgan', n), 'C4', 'v')]
    levers = self.levers()
    # Lever cells: colours off the tab10 cycle of the series above, and
    # markers of their own, so that no two series look alike.
    style = {v: (plt.cm.viridis(i / max(1, len(levers) - 1) * 0.9),
                 'PX*hpd<>'[i % 8]) for i, v in enumerate(levers)}
    name = lambda m, t: 'TCN FF' if m == 'ff' else f'TCN GAN ({t})'
    for m, t, v in levers:
      series.append((f'{name(m, t)} + {_short(v)}', lambda n, m=m, t=t, v=v:
                     self.cell(self.key(m, n, t, variant=v)),
                     *style[m, t, v]))
    teacher = stats([r.r['teacher_test_acc'] for r in self.teachers])

    # 1. Accuracy vs n.
    fig, ax = plt.subplots(figsize=(10, 6))   # As wide as the legend.
    for label, get, color, marker in series:
      pts = [(n, get(n)) for n in NS if get(n)]
      if pts:
        ax.errorbar([n for n, _ in pts], [100 * s['mean'] for _, s in pts],
                    yerr=[100 * (s['std'] or 0) for _, s in pts], color=color,
                    marker=marker, capsize=3, label=f'{label} (ours)')
    ax.plot(NS, [PAPER['ff'][n] for n in NS], '--o', color='C0', mfc='none',
            alpha=.6, label='TCN FF (paper)')
    ax.plot(NS, [PAPER['gan'][n] for n in NS], '--s', color='C1', mfc='none',
            alpha=.6, label='TCN GAN (paper)')
    ax.axhline(PAPER['kd'], color='C3', ls=':', alpha=.6, label='KD (paper)')
    if teacher:
      ax.axhline(100 * teacher['mean'], color='k', label='teacher (ours)')
    ax.axhline(PAPER['teacher'], color='k', ls=':', alpha=.6,
               label='teacher (paper)')
    ax.set_xscale('log', base=2)
    ax.set_xticks(NS, [str(n) for n in NS])
    ax.set_xlabel('number of students n')
    ax.set_ylabel('test accuracy (%)')
    ax.set_title('Fashion-MNIST: accuracy vs n')
    ax.legend(fontsize=7, loc='upper center', bbox_to_anchor=(0.5, -0.12),
              ncol=2)
    ax.grid(alpha=.3)
    fig.tight_layout()
    files.append(self._save(fig, out, 'acc_vs_n.png'))
    plt.close(fig)

    # 2. Accuracy vs total student parameters.
    fig, ax = plt.subplots(figsize=(10, 6))   # As wide as the legend.
    tcn_series = [
        ('TCN FF', lambda n: self.key('ff', n), 'C0', 'o', '-'),
        ("TCN GAN (paper's loss)",
         lambda n: self.key('gan', n, 'student_output'), 'C1', 's', '-'),
        ("TCN GAN (authors' loss)",
         lambda n: self.key('gan', n, 'disc_reconstruction'), 'C2', '^', '-')]
    tcn_series += [   # Levers: points, in the colours of plot 1.
        (f'{name(m, t)} + {_short(v)}',
         lambda n, m=m, t=t, v=v: self.key(m, n, t, variant=v),
         *style[m, t, v], '') for m, t, v in levers]
    for label, key, color, marker, ls in tcn_series:
      xs, ys, ns = [], [], []
      for n in NS:
        runs = self.tcn.get(key(n), [])
        if runs:
          xs.append(runs[0].r['params']['students_total'])
          ys.append(100 * self.cell(key(n))['mean'])
          ns.append(n)
      if xs:
        ax.plot(xs, ys, marker=marker, color=color, ls=ls, label=label)
        for x, y, n in zip(xs, ys, ns):
          ax.annotate(f'n={n}', (x, y), fontsize=7, xytext=(3, 3),
                      textcoords='offset points')
    for stage, label, color, marker in (('kd', 'Hinton KD', 'C3', 'D'),
                                        ('kdgan', 'KDGAN', 'C4', 'v')):
      xs, ys = [], []
      for n in NS:
        runs = self.base[stage][n]
        if runs:
          xs.append(runs[0].r[stage]['params'])
          ys.append(100 * self.baseline(stage, n)['mean'])
      if xs:
        ax.plot(xs, ys, marker=marker, color=color, ls='', label=label)
    if teacher:
      p = self.teachers[0].r['params']['teacher']
      ax.plot([p], [100 * teacher['mean']], 'k*', ms=10, label='teacher')
    ax.plot([94650], [PAPER['kd']], 'D', color='C3', mfc='none',
            label='KD (paper, 94.65k)')
    ax.set_xscale('log')
    ax.set_xlabel('parameters (all students of a TCN; the KD student; the '
                  'teacher)')
    ax.set_ylabel('test accuracy (%)')
    ax.set_title('Fashion-MNIST: accuracy vs parameters')
    ax.legend(fontsize=7, loc='upper center', bbox_to_anchor=(0.5, -0.14),
              ncol=2)
    ax.grid(alpha=.3)
    fig.tight_layout()
    files.append(self._save(fig, out, 'acc_vs_params.png'))
    plt.close(fig)

    # 3. Per-student MSE, n = 4.
    bars = []
    for label, k in (('ours FF', self.key('ff', 4)),
                     ("ours GAN (paper's loss)",
                      self.key('gan', 4, 'student_output'))):
      runs = self.tcn.get(k, [])
      if runs:
        bars.append((label, [sum(r.r['student_val_mse'][i] for r in runs) /
                             len(runs) for i in range(4)]))
    bars += [('paper FF (Table 1)', PAPER_T1['ff']),
             ('paper GAN (Table 1)', PAPER_T1['gan']),
             ("authors' notebooks FF", NOTEBOOK_MSE[4])]
    fig, ax = plt.subplots(figsize=(7, 4))
    width = .8 / len(bars)
    for i, (label, vals) in enumerate(bars):
      ax.bar([j + i * width for j in range(4)], vals, width, label=label)
    ax.set_xticks([j + .4 - width / 2 for j in range(4)],
                  [f's{j + 1}' for j in range(4)])
    ax.set_ylabel('validation MSE to the chunk')
    dr = self.tcn.get(self.key('gan', 4, 'disc_reconstruction'), [])
    note = ''
    if dr:
      note = (f"\n(GAN with the authors' loss: "
              f"{sum(sum(r.r['student_val_mse']) for r in dr) / (4 * len(dr)):.2f}"
              ' mean, off scale, not drawn)')
    ax.set_title('Per-student MSE, n = 4' + note, fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=.3, axis='y')
    fig.tight_layout()
    files.append(self._save(fig, out, 'student_mse.png'))
    plt.close(fig)
    return files

  @staticmethod
  def _save(fig, out, name):
    path = os.path.join(out, name)
    # 'tight': the legends sit below the axes, outside the figure box.
    fig.savefig(path, dpi=110, bbox_inches='tight')
    return name


def main():
  ap = argparse.ArgumentParser(
      description=__doc__.split('\n\n')[0],
      formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog=__doc__.split('\n\n', 1)[1])
  ap.add_argument('roots', nargs='+', help='directories to search')
  ap.add_argument('--out', required=True, help='output directory')
  ap.add_argument('--note', default='', help='a paragraph for the top of '
                  'the markdown (where and how the runs were made)')
  args = ap.parse_args()
  command = 'python experiments/tables.py ' + shlex.join(sys.argv[1:])
  recs, skipped = load(args.roots)
  if not recs:
    ap.error(f'no Fashion-MNIST results.json under {args.roots}')
  t = Tables(recs)
  t.table3()
  t.table1()
  t.table2()
  t.table4()
  t.table8()
  t.chunking()
  os.makedirs(args.out, exist_ok=True)
  files = t.plots(args.out)
  sources = [f'`{_show(r.path)}` ({r.name}: {r.r["method"]}'
             f'{" " + r.target if r.target else ""}, n={r.n}, seed {r.seed}, '
             f'{r.backend}{", data subset" if r.subset else ""})'
             for r in recs]
  md = ['# Fashion-MNIST: the paper\'s tables from our runs', '',
        f'Command: `{command}`', '']
  if args.note:
    md += [args.note, '']
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
  with open(os.path.join(args.out, 'tables.md'), 'w') as f:
    f.write('\n'.join(md) + '\n')
  with open(os.path.join(args.out, 'tables.json'), 'w') as f:
    json.dump({'command': command,
               'sources': [_show(r.path) for r in recs],
               'plots': files, **t.data}, f, indent=1)
  print('\n'.join(md))


if __name__ == '__main__':
  main()
