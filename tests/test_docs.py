"""The README as a front page and the docs site under docs/: the README's
length, its commands and presets table (equal to the registry), the guides'
code examples (run here on tiny data), a docstring for every public name,
and (slow, when Sphinx is installed) the site built with warnings as errors.
.ci/run builds the site too, before the tests."""
import os
import re
import subprocess
import sys

import pytest

from tcn_jax import presets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, 'docs')
sys.path.insert(0, os.path.join(DOCS, '_ext'))
import tcn_docs  # pylint: disable=g-import-not-at-top,wrong-import-position

MAX_README_LINES = 170
INSTALL_AND_RUN = (
    "apt-get update && apt-get install -y dataset-fashion-mnist && "
    "pip install -e '.[test]' && python -m tcn_jax.main --config "
    "configs/fashion_mnist.py:best --workdir runs/fmnist")
TEST_COMMAND = 'python -m pytest tests'
# A fenced block that tests/test_docs.py runs follows this marker line.
RUN_MARK = '<!-- test: run -->'


def _read(*path):
  with open(os.path.join(ROOT, *path)) as f:
    return f.read()


def _pages():
  for folder, _, files in os.walk(DOCS):
    if os.path.relpath(folder, DOCS).split(os.sep)[0] in (
        '_build', 'api', 'notebooks'):
      continue
    for name in sorted(files):
      if name.endswith('.md'):
        yield os.path.relpath(os.path.join(folder, name), ROOT)


def _runnable(text):
  """The ```python blocks that follow RUN_MARK, in order."""
  return re.findall(re.escape(RUN_MARK) + r'\n```python\n(.*?)^```', text,
                    re.S | re.M)


def test_readme_is_a_front_page():
  lines = _read('README.md').splitlines()
  assert len(lines) <= MAX_README_LINES, (
      f'README.md has {len(lines)} lines (at most {MAX_README_LINES}): move '
      'sections into the guides under docs/')


def test_readme_opens_with_the_two_commands():
  """The first two fenced commands are the install + main job and the test
  command, and .ci/run ends with that test command."""
  blocks = re.findall(r'^```bash\n(.*?)\n```', _read('README.md'), re.S | re.M)
  assert blocks[:2] == [INSTALL_AND_RUN, TEST_COMMAND]
  ci = [l for l in _read('.ci', 'run').splitlines() if l.strip()]
  assert ci[-1] == TEST_COMMAND
  assert re.search(r'^python -m sphinx -W .* docs docs/_build/html$',
                   _read('.ci', 'run'), re.M)
  started = _read('docs', 'getting_started.md')
  assert INSTALL_AND_RUN in started and TEST_COMMAND in started


def test_readme_states_what_depends_on_the_machine():
  readme = ' '.join(_read('README.md').split())
  assert ('bitwise on the same machine type; across CPU types within float '
          'rounding, a few tenths of a point') in readme
  assert '20.2 min' in readme and 'AVX-512' in readme


def test_readme_presets_table_is_the_registry():
  rows = re.findall(r'^\| `(\w+)` \| (.*) \| (yes|no) \|$', _read('README.md'),
                    re.M)
  assert [r[0] for r in rows] == list(presets.PRESETS.names())
  for name, changes, in_paper in rows:
    p = presets.PRESETS.get(name)
    assert changes == p.changes, (
        f'README.md, preset {name}: copy the registry\'s text: {p.changes!r}')
    assert (in_paper == 'yes') == p.in_paper, name


def test_site_presets_table_is_generated_from_the_registry():
  rows = tcn_docs.presets_table()[2:]
  assert [re.match(r'\| `(\w+)`', r).group(1) for r in rows] == list(
      presets.PRESETS.names())


def test_every_public_name_has_a_docstring_and_a_page():
  import tcn_jax  # pylint: disable=g-import-not-at-top
  names = tcn_docs.public_names()
  if hasattr(tcn_jax, '__all__'):
    assert names == list(tcn_jax.__all__)
  else:   # Everything `import tcn_jax as tcn` offers but submodules.
    offered = {n for n, v in vars(tcn_jax).items()
               if not n.startswith('_') and not isinstance(v, type(os))}
    assert offered <= set(names), sorted(offered - set(names))
  assert all(hasattr(tcn_jax, n) for n in names)
  assert not tcn_docs.missing_docstrings(), (
      'public names without a docstring (the site build fails on them)')


# Pages the site's build generates under docs/ (git-ignored).
GENERATED = ('api' + os.sep, 'notebooks' + os.sep)


def test_links_between_pages_exist():
  """Relative links in the README and the pages name files that exist."""
  for page in ['README.md'] + list(_pages()):
    here = os.path.dirname(os.path.join(ROOT, page))
    for target in re.findall(r'\]\(([^)\s:#]+)(?:#[^)\s]*)?\)', _read(page)):
      path = os.path.normpath(os.path.join(here, target))
      if os.path.relpath(path, os.path.join(ROOT, 'docs')).startswith(
          GENERATED):   # Written by the site's build.
        continue
      assert os.path.exists(path), (page, target)


RUNNABLE = [p for p in _pages() if _runnable(_read(p))]


def test_guides_have_runnable_examples():
  assert {'docs/guides/data.md', 'docs/guides/teacher.md',
          'docs/guides/export.md'} <= set(RUNNABLE)


@pytest.mark.parametrize('page', RUNNABLE)
def test_guide_examples_run(page, tmp_path, monkeypatch):
  """A page's marked blocks run in order in one namespace (like a notebook),
  in an empty working directory."""
  monkeypatch.chdir(tmp_path)
  namespace = {'__name__': '__docs__'}
  for i, block in enumerate(_runnable(_read(page))):
    exec(compile(block, f'{page}[block {i}]', 'exec'), namespace)  # pylint: disable=exec-used


@pytest.mark.slow
def test_site_builds_with_warnings_as_errors(tmp_path):
  pytest.importorskip('sphinx')
  pytest.importorskip('myst_nb')
  pytest.importorskip('sphinx_book_theme')
  out = subprocess.run(
      [sys.executable, '-m', 'sphinx', '-W', '--keep-going', '-q', '-E',
       '-b', 'html', '-d', str(tmp_path / 'doctrees'), 'docs',
       str(tmp_path / 'html')], cwd=ROOT, capture_output=True, text=True,
      check=False)
  assert out.returncode == 0, out.stderr[-4000:]
  for page in ('index', 'presets', 'api/index', 'notebooks/quickstart',
               'architecture', 'guides/scaling'):
    assert (tmp_path / 'html' / f'{page}.html').exists(), page
