"""Fashion-MNIST results.json files, normalised for the tables: which
configuration a run is (method, GAN loss, n, chunking, students, the levers
that are not in the paper), read from the run's own resolved config.json.

Older results.json files lack some fields: without 'gan' the GAN loss is
read from the file name (student_output / disc_reconstruction), without
'chunking' the chunks are contiguous, without 'kd' / 'kdgan' there is no
baseline. Baselines come from whichever run carries them: a ff<n> run with
--config.kd.enabled / --config.kdgan.enabled, or a separate kd<n> / kdgan<n>
workdir (the older grid layout). Without a config.json beside a result,
epochs are those of the current configs/fashion_mnist.py (marked *).
"""
import functools
import os

from experiments import common

PRUNE = {'teacher', 'students', 'head', 'kd', 'kdgan', 'tcn', 'tensorboard'}

_SHORT = (('logit matching x1 at T=2', 'logit'), ('cosine LR', 'cos LR'),
          ('BatchNorm in students', 'BN'),
          ('48-unit instead of 16-unit bottleneck', 'wide'),
          ('mirrored images added (flip)', 'flip'),
          ('slim students (eight within 100k)', 'slim'),
          ('pca (balanced) chunks', 'PCA'))


def short(variant):
  """A lever list short enough for a plot legend."""
  for long, abbrev in _SHORT:
    variant = variant.replace(long, abbrev)
  return variant


@functools.cache
def _arch_levers():
  """((student trunk, lever name), ...) of the trunks that are levers, and
  the function that adds BatchNorm to a trunk (the ':bn' preset)."""
  try:
    from tcn_jax import presets as mod  # pylint: disable=g-import-not-at-top
  except ImportError:   # Before the presets moved into the library.
    mod = common.config_module()
  return (((mod.WIDE_FMNIST, '48-unit instead of 16-unit bottleneck'),
           (mod.SLIM_FMNIST_8, 'slim students (eight within 100k)')),
          mod.with_batchnorm)


class Rec:
  """One results.json, normalised. cfg: the run's resolved config (see
  common.read_config), or None."""

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
    self.chunking = r.get('chunking') or 'contiguous'
    st = (cfg or {}).get('students') or {}
    arch = str(st.get('arch', '')) if cfg else ''
    self.hetero = '|' in arch or len(set(r['params']['students_each'])) > 1
    self.variant = ', '.join(self._levers(cfg, st, arch))
    self.subset = bool(cfg and (cfg['data'].get('train_size') or
                                cfg['data'].get('test_size')))
    digests = r.get('digests') or {}
    self.teacher_digest = digests.get('teacher', path)
    self.tcn_digest = digests.get('tcn', path)
    self.backend = r.get('backend', '?')

  @property
  def preset(self):
    """The config preset whose schedules the paper uses for this method."""
    return 'gan' if self.method == 'gan' else ''

  def _levers(self, cfg, st, arch):
    """The levers that are not in the paper ([] = paper-faithful)."""
    levers = []
    if st.get('logit_weight'):
      levers.append(f'logit matching x{st["logit_weight"]:g} at '
                    f'T={st.get("logit_temperature", 2.0):g}')
    if st.get('lr_schedule', 'constant') != 'constant':
      levers.append(f'{st["lr_schedule"]} LR')
    if ' BN' in arch:
      levers.append('BatchNorm in students')
    trunks, with_batchnorm = _arch_levers()
    for spec, lever in trunks:
      if arch in (spec, with_batchnorm(spec)):
        levers.append(lever)
    if st.get('augment'):
      levers.append('mirrored images added (flip)')
    if cfg:   # Another adversarial weight or schedule than the paper's.
      paper = common.paper_config(self.n, self.preset)
      adv_paper = paper['gan']['adv_weight']
      adv = (cfg.get('gan') or {}).get('adv_weight', adv_paper)
      if self.method == 'gan' and adv != adv_paper:
        levers.append(f'adversarial weight {adv:g} (paper {adv_paper:g})')
      for stage in ('students', 'head'):
        ours, theirs = cfg[stage]['epochs'], paper[stage]['epochs']
        if ours != theirs:
          levers.append(f'{ours} {stage} epochs (paper {theirs})')
    if levers and self.chunking != 'contiguous':
      levers.append(f'{self.chunking} chunks')
    return levers

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
    if self.cfg is not None:
      return self.cfg[stage]['epochs'], True
    return common.paper_config(self.n, self.preset)[stage]['epochs'], False


def load(roots):
  """(Recs of every Fashion-MNIST results.json under the roots, skipped
  files of other datasets). A workdir's results.json is named after its
  directory and read with the config.json beside it; any other *.json that
  is a results.json copy is named after the file."""
  recs, skipped = [], []
  for root in roots:
    for dirpath, dirs, files in os.walk(root):
      dirs[:] = sorted(d for d in dirs if d not in PRUNE)
      for f in sorted(files):
        if not f.endswith('.json') or f == 'config.json':
          continue
        path = os.path.join(dirpath, f)
        r = common.read_results(path)
        if r is None:
          continue
        if r.get('dataset') != 'fashion_mnist':
          skipped.append(f'{path} (dataset {r.get("dataset")})')
          continue
        cpath = os.path.join(dirpath, 'config.json')
        cfg = (common.read_config(cpath)
               if f == 'results.json' and os.path.isfile(cpath) else None)
        recs.append(Rec(path, root, r, cfg))
  return recs, skipped


def unique(recs, key):
  """recs without repeats of key(rec) (the same run reached twice, e.g. a
  kd<n> workdir of the older layout that copied ff<n>'s students)."""
  seen, out = set(), []
  for r in recs:
    k = key(r)
    if k not in seen:
      seen.add(k)
      out.append(r)
  return out
