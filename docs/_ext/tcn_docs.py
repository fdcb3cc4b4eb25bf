"""The site's generated parts, made at build time so they follow the code.

- `api/index.rst`: an autosummary of every public name of `tcn_jax`
  (`tcn_jax.__all__` when it exists, else the names `tcn_jax/__init__.py`
  imports or defines); a public name without a docstring is a warning, so
  the build with -W (CI) fails.
- `notebooks/*.ipynb`: copies of the repository's notebooks (rendered, not
  executed).
- the `tcn-presets` directive: the presets table from `tcn_jax.presets`.
"""
import ast
import dataclasses
import importlib
import inspect
import os
import re
import shutil

DOCS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOT = os.path.dirname(DOCS)


def public_names(module_name: str = 'tcn_jax') -> list[str]:
  """`module.__all__`, else every name its `__init__.py` imports or defines
  at top level that does not start with an underscore, in source order."""
  module = importlib.import_module(module_name)
  if hasattr(module, '__all__'):
    return list(module.__all__)
  with open(module.__file__) as f:
    tree = ast.parse(f.read())
  names = []
  for node in tree.body:
    if isinstance(node, (ast.Import, ast.ImportFrom)):
      names += [a.asname or a.name.split('.')[0] for a in node.names]
    elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
      names.append(node.name)
    elif isinstance(node, ast.Assign):
      names += [t.id for t in node.targets if isinstance(t, ast.Name)]
  return [n for n in dict.fromkeys(names) if not n.startswith('_')]


def missing_docstrings(module_name: str = 'tcn_jax') -> list[str]:
  """The public names whose object has no docstring of its own (a
  dataclass's generated signature does not count)."""
  module = importlib.import_module(module_name)
  missing = []
  for name in public_names(module_name):
    obj = getattr(module, name)
    doc = obj.__dict__.get('__doc__') if inspect.isclass(obj) else getattr(
        obj, '__doc__', None)
    if inspect.isclass(obj) and dataclasses.is_dataclass(obj) and doc and (
        doc.startswith(obj.__name__ + '(')):
      doc = None
    if not (doc or '').strip():
      missing.append(name)
  return missing


API_HEADER = """\
API reference
=============

Every public name of ``tcn_jax`` (``import tcn_jax as tcn``), generated
from the docstrings. This page is written at build time from the package's
public names, so a new or renamed name appears here by itself.

.. currentmodule:: tcn_jax

.. autosummary::
   :toctree: generated
   :nosignatures:

"""


def _write_if_changed(path, text):
  if os.path.exists(path):
    with open(path) as f:
      if f.read() == text:
        return
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w') as f:
    f.write(text)


def generate(app, config=None):
  """`config-inited`: checks the docstrings, writes api/index.rst and copies
  the notebooks."""
  from sphinx.util import logging  # pylint: disable=g-import-not-at-top
  del config
  for name in missing_docstrings():   # -W (CI) makes each one an error.
    logging.getLogger(__name__).warning(
        'tcn_jax.%s is a public name without a docstring: write one (Args:, '
        'Returns:) where it is defined', name, type='tcn_docs',
        subtype='docstring')
  names = public_names()
  _write_if_changed(os.path.join(app.srcdir, 'api', 'index.rst'),
                    API_HEADER + ''.join(f'   {n}\n' for n in names))
  out = os.path.join(app.srcdir, 'notebooks')
  os.makedirs(out, exist_ok=True)
  for name in sorted(os.listdir(os.path.join(ROOT, 'notebooks'))):
    if name.endswith('.ipynb'):
      src, dst = os.path.join(ROOT, 'notebooks', name), os.path.join(out, name)
      if not os.path.exists(dst) or open(src, 'rb').read() != open(
          dst, 'rb').read():
        shutil.copyfile(src, dst)


def presets_table() -> list[str]:
  """The presets as a Markdown table: name, what it changes, in the paper,
  the datasets it exists for (the README's table has the first three)."""
  from tcn_jax import presets  # pylint: disable=g-import-not-at-top
  rows = ['| preset | what it changes | in the paper? | datasets |',
          '|---|---|---|---|']
  for name in presets.PRESETS.names():
    p = presets.PRESETS.get(name)
    rows.append(f'| `{p.name}` | {p.changes} | {"yes" if p.in_paper else "no"}'
                f' | {", ".join(p.datasets) or "any"} |')
  return rows


def _presets_directive():
  """The `{tcn-presets}` directive: the preset registry's table, parsed as
  MyST (Sphinx is imported only here, so the tests import this module
  without it)."""
  from docutils import nodes  # pylint: disable=g-import-not-at-top
  from docutils.statemachine import StringList  # pylint: disable=g-import-not-at-top
  from sphinx.util.docutils import SphinxDirective  # pylint: disable=g-import-not-at-top

  class PresetsTable(SphinxDirective):

    def run(self):
      container = nodes.container()
      self.state.nested_parse(
          StringList(presets_table(), self.get_source_info()[0]),
          self.content_offset, container)
      return container.children
  return PresetsTable


# The docstrings' house style, read as reST: "`Split`s" (a role followed by a
# letter) and argument names that wrap ("epochs, batch_size, ...,\n    init:
# ...") in an Args section.
_ROLE_THEN_LETTER = re.compile(r'(`[^`\s][^`]*`)(?=[A-Za-z])')
_SECTION = re.compile(r'^\s*(Args|Arguments|Attributes|Returns|Raises|Yields'
                      r'|Example|Examples|Note|Notes):\s*$')


def house_style(app, what, name, obj, options, lines):
  """Rewrites docstring `lines` in place before napoleon reads them."""
  del app, what, name, obj, options
  out, section = [], None
  for line in lines:
    match = _SECTION.match(line)
    if match:
      section = match.group(1)
    prev = out[-1] if out else ''
    if (section in ('Args', 'Arguments', 'Attributes') and out
        and prev.rstrip().endswith(',') and ':' not in prev
        and line.strip() and _indent(line) > _indent(prev)):
      out[-1] = prev.rstrip() + ' ' + line.strip()
      continue
    out.append(_ROLE_THEN_LETTER.sub(r'\1\\ ', line))
  lines[:] = out


def _indent(line):
  return len(line) - len(line.lstrip())


# Links from pages under docs/ to files elsewhere in the repository (written
# as relative paths, so they work on GitHub too) become links to the file in
# the repository: `[x](../experiments/results/y.md)` -> `repo:...`.
_LINK = re.compile(r'\]\(([^)\s:#]+)(#[^)\s]*)?\)')


def repository_links(app, docname, source):
  """`source-read` / `include-read`: rewrites relative links that leave
  docs/ into `repo:` links (conf.py's `myst_url_schemes`)."""
  here = os.path.dirname(app.env.doc2path(docname))
  if not isinstance(source[0], str):
    return

  def one(match):
    target = os.path.normpath(os.path.join(here, match.group(1)))
    inside = os.path.relpath(target, app.srcdir)
    if inside.startswith('..') and os.path.exists(target):
      return f'](repo:{os.path.relpath(target, ROOT)}{match.group(2) or ""})'
    return match.group(0)
  source[0] = _LINK.sub(one, source[0])


def include_links(app, relative_path, parent_docname, content):
  """`include-read`: the same for an included file (ARCHITECTURE.md), whose
  links are relative to its own folder."""
  del parent_docname
  here = os.path.dirname(os.path.join(app.srcdir, relative_path))

  def one(match):
    target = os.path.normpath(os.path.join(here, match.group(1)))
    inside = os.path.relpath(target, app.srcdir)
    if os.path.exists(target) and (inside.startswith('..')):
      return f'](repo:{os.path.relpath(target, ROOT)}{match.group(2) or ""})'
    return match.group(0)
  content[0] = _LINK.sub(one, content[0])


def setup(app):
  app.connect('config-inited', generate)
  app.connect('autodoc-process-docstring', house_style, priority=400)
  app.connect('source-read', repository_links)
  app.connect('include-read', include_links)
  app.add_directive('tcn-presets', _presets_directive())
  return {'parallel_read_safe': True, 'parallel_write_safe': True}
