"""The three plots of the Fashion-MNIST tables: accuracy vs n, accuracy vs
parameters, per-student MSE (n = 4), with the paper's numbers."""
import os

from experiments import paper
from experiments.common import stats
from experiments.records import short

NS = paper.NS
PAPER = paper.TABLE3['fashion_mnist']


def plots(tab, out):
  """Writes the plots of `tab` (fmnist_tables.Tables) to out/; returns their
  file names."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  files = []
  series = [('TCN FF', lambda n: tab.cell(tab.key('ff', n)), 'C0', 'o'),
            ("TCN GAN (paper's loss)", lambda n: tab.cell(
                tab.key('gan', n, 'student_output')), 'C1', 's'),
            ("TCN GAN (authors' loss)", lambda n: tab.cell(
                tab.key('gan', n, 'disc_reconstruction')), 'C2', '^'),
            ('Hinton KD', lambda n: tab.baseline('kd', n), 'C3', 'D'),
            ('KDGAN', lambda n: tab.baseline('kdgan', n), 'C4', 'v')]
  levers = tab.levers()
  # Lever cells: colours off the tab10 cycle of the series above, and
  # markers of their own, so that no two series look alike.
  style = {v: (plt.cm.viridis(i / max(1, len(levers) - 1) * 0.9),
               'PX*hpd<>'[i % 8]) for i, v in enumerate(levers)}
  name = lambda m, t: 'TCN FF' if m == 'ff' else f'TCN GAN ({t})'
  for m, t, v in levers:
    series.append((f'{name(m, t)} + {short(v)}', lambda n, m=m, t=t, v=v:
                   tab.cell(tab.key(m, n, t, variant=v)),
                   *style[m, t, v]))
  teacher = stats([r.r['teacher_test_acc'] for r in tab.teachers])

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
  files.append(_save(fig, out, 'acc_vs_n.png'))
  plt.close(fig)

  # 2. Accuracy vs total student parameters.
  fig, ax = plt.subplots(figsize=(10, 6))   # As wide as the legend.
  tcn_series = [
      ('TCN FF', lambda n: tab.key('ff', n), 'C0', 'o', '-'),
      ("TCN GAN (paper's loss)",
       lambda n: tab.key('gan', n, 'student_output'), 'C1', 's', '-'),
      ("TCN GAN (authors' loss)",
       lambda n: tab.key('gan', n, 'disc_reconstruction'), 'C2', '^', '-')]
  tcn_series += [   # Levers: points, in the colours of plot 1.
      (f'{name(m, t)} + {short(v)}',
       lambda n, m=m, t=t, v=v: tab.key(m, n, t, variant=v),
       *style[m, t, v], '') for m, t, v in levers]
  for label, key, color, marker, ls in tcn_series:
    xs, ys, ns = [], [], []
    for n in NS:
      runs = tab.tcn.get(key(n), [])
      if runs:
        xs.append(runs[0].r['params']['students_total'])
        ys.append(100 * tab.cell(key(n))['mean'])
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
      runs = tab.base[stage][n]
      if runs:
        xs.append(runs[0].r[stage]['params'])
        ys.append(100 * tab.baseline(stage, n)['mean'])
    if xs:
      ax.plot(xs, ys, marker=marker, color=color, ls='', label=label)
  if teacher:
    p = tab.teachers[0].r['params']['teacher']
    ax.plot([p], [100 * teacher['mean']], 'k*', ms=10, label='teacher')
  ax.plot([paper.KD_PARAMS], [PAPER['kd']], 'D', color='C3', mfc='none',
          label=f'KD (paper, {paper.KD_PARAMS / 1e3:.2f}k)')
  ax.set_xscale('log')
  ax.set_xlabel('parameters (all students of a TCN; the KD student; the '
                'teacher)')
  ax.set_ylabel('test accuracy (%)')
  ax.set_title('Fashion-MNIST: accuracy vs parameters')
  ax.legend(fontsize=7, loc='upper center', bbox_to_anchor=(0.5, -0.14),
            ncol=2)
  ax.grid(alpha=.3)
  fig.tight_layout()
  files.append(_save(fig, out, 'acc_vs_params.png'))
  plt.close(fig)

  # 3. Per-student MSE, n = 4.
  bars = []
  for label, k in (('ours FF', tab.key('ff', 4)),
                   ("ours GAN (paper's loss)",
                    tab.key('gan', 4, 'student_output'))):
    runs = tab.tcn.get(k, [])
    if runs:
      bars.append((label, [sum(r.r['student_val_mse'][i] for r in runs) /
                           len(runs) for i in range(4)]))
  bars += [('paper FF (Table 1)', paper.TABLE1['ff']),
           ('paper GAN (Table 1)', paper.TABLE1['gan']),
           ("authors' notebooks FF", paper.NOTEBOOK_MSE[4])]
  fig, ax = plt.subplots(figsize=(7, 4))
  width = .8 / len(bars)
  for i, (label, vals) in enumerate(bars):
    ax.bar([j + i * width for j in range(4)], vals, width, label=label)
  ax.set_xticks([j + .4 - width / 2 for j in range(4)],
                [f's{j + 1}' for j in range(4)])
  ax.set_ylabel('validation MSE to the chunk')
  dr = tab.tcn.get(tab.key('gan', 4, 'disc_reconstruction'), [])
  note = ''
  if dr:
    note = (f"\n(GAN with the authors' loss: "
            f"{sum(sum(r.r['student_val_mse']) for r in dr) / (4 * len(dr)):.2f}"
            ' mean, off scale, not drawn)')
  ax.set_title('Per-student MSE, n = 4' + note, fontsize=9)
  ax.legend(fontsize=7)
  ax.grid(alpha=.3, axis='y')
  fig.tight_layout()
  files.append(_save(fig, out, 'student_mse.png'))
  plt.close(fig)
  return files


def _save(fig, out, name):
  path = os.path.join(out, name)
  # 'tight': the legends sit below the axes, outside the figure box.
  fig.savefig(path, dpi=110, bbox_inches='tight')
  return name
