"""The notebooks in notebooks/: each runs top to bottom (small settings),
is committed without outputs, and the README opens it in Colab."""
import glob
import os
import re

import pytest

from helpers import needs_fmnist
from helpers import ROOT

nbformat = pytest.importorskip('nbformat')
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, 'notebooks', '*.ipynb')))
NAMES = [os.path.basename(p) for p in NOTEBOOKS]
# Colab's address of a notebook on GitHub: the README's badges use it.
WIDGET = 'application/vnd.jupyter.widget-view+json'
COLAB = 'https://colab.research.google.com/github/{}/blob/main/notebooks/{}'


def _stdout(cell):
  return ''.join(o.get('text', '') for o in cell.get('outputs', [])
                 if o.get('output_type') == 'stream' and o['name'] == 'stdout')


def _repository():
  """owner/name of the repository that quickstart's install cell names."""
  nb = nbformat.read(os.path.join(ROOT, 'notebooks', 'quickstart.ipynb'), 4)
  source = '\n'.join(c.source for c in nb.cells if c.cell_type == 'code')
  match = re.search(r"REPOSITORY = 'https://github\.com/([^/']+/[^/']+)'",
                    source)
  assert match, 'quickstart.ipynb: no REPOSITORY in its install cell'
  return match.group(1)


def test_there_are_notebooks():
  assert 'quickstart.ipynb' in NAMES


@pytest.mark.slow
@needs_fmnist
@pytest.mark.parametrize('path', NOTEBOOKS, ids=NAMES)
def test_notebook_runs_top_to_bottom(path, monkeypatch):
  """Executed in a fresh python3 kernel at the repository root with
  TCN_NOTEBOOK_SMALL=1: no cell raises (nbclient stops on the first error),
  every code cell ran, in order, and the last one printed an accuracy."""
  nbclient = pytest.importorskip('nbclient')
  monkeypatch.setenv('TCN_NOTEBOOK_SMALL', '1')
  monkeypatch.delenv('TCN_NOTEBOOK_WORKDIR', raising=False)
  nb = nbformat.read(path, 4)
  nbclient.NotebookClient(nb, timeout=300, kernel_name='python3',
                          resources={'metadata': {'path': ROOT}}).execute()
  code = [c for c in nb.cells if c.cell_type == 'code']
  assert [c.execution_count for c in code] == list(range(1, len(code) + 1))
  assert re.search(r'accuracy\D{0,40}\d\.\d', _stdout(code[-1])), (
      f'{os.path.basename(path)}: its last cell printed no accuracy: '
      f'{_stdout(code[-1])!r}')
  if os.path.basename(path) == 'quickstart.ipynb':
    outputs = [o for c in code for o in c.outputs]
    # It imported this checkout, showed its three figures and, in a kernel,
    # a live progress bar per stage.
    assert f'tcn_jax from {os.path.join(ROOT, "tcn_jax")}' in _stdout(code[1])
    assert sum('image/png' in o.get('data', {}) for o in outputs) == 3
    # A text bar on stderr, or with ipywidgets (Colab) a widget per stage.
    stderr = ''.join(o.get('text', '') for o in outputs
                     if o.get('name') == 'stderr')
    widgets = ''.join(o['data']['text/plain'] + '\n' for o in outputs
                      if WIDGET in o.get('data', {}))
    # The students' stage is named by its members: students[0,1].
    for stage in ('teacher', r'students\[0[-,\d]*\]', 'head'):
      done = re.search(stage + r': 100%\|', stderr)
      assert done or re.search(stage + ': ', widgets), stage


@pytest.mark.parametrize('path', NOTEBOOKS, ids=NAMES)
def test_committed_notebook_has_no_outputs(path):
  nb = nbformat.read(path, 4)
  nbformat.validate(nb)
  assert nb.metadata.kernelspec.name == 'python3'
  for i, cell in enumerate(nb.cells):
    if cell.cell_type == 'code':
      assert not cell.outputs and cell.execution_count is None, (
          f'{os.path.basename(path)} cell {i} holds outputs: clear them')


@pytest.mark.parametrize('path', NOTEBOOKS, ids=NAMES)
def test_readme_opens_notebook_in_colab(path):
  """The README's Colab link of every notebook names the repository that
  quickstart installs from (one place to change when it moves)."""
  with open(os.path.join(ROOT, 'README.md')) as f:
    readme = f.read()
  url = COLAB.format(_repository(), os.path.basename(path))
  assert url in readme
