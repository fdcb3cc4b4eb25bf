"""Sphinx configuration of the tcn_jax site (MyST pages, myst-nb notebooks,
an API reference generated from `tcn_jax`'s public names).

Build (what .ci/run does, warnings as errors):

  python -m sphinx -W --keep-going -b html docs docs/_build/html
"""
import os
import sys

DOCS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(DOCS)
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(DOCS, '_ext'))

project = 'tcn_jax'
author = 'tcn_jax contributors'
copyright = 'tcn_jax contributors'  # pylint: disable=redefined-builtin

extensions = [
    'myst_nb',
    'sphinx.ext.autodoc',
    'sphinx.ext.autosummary',
    'sphinx.ext.napoleon',
    'tcn_docs',
]

# The repository on GitHub: the one place that names it here (the README's
# Colab badges and quickstart.ipynb's REPOSITORY name it too).
REPOSITORY = 'https://github.com/GITHUB_ORG/tcn_jax'

# Files outside docs/ (experiments/results, configs, tests) are linked as
# `[text](repo:path/in/repository)`: a link to the file in the repository.
myst_url_schemes = {
    'http': None, 'https': None, 'mailto': None,
    'repo': REPOSITORY + '/blob/main/{{path}}',
}
myst_enable_extensions = ['colon_fence', 'deflist']
myst_heading_anchors = 4

# Notebooks are rendered, not executed (tests/test_notebooks.py runs them).
nb_execution_mode = 'off'

source_suffix = {'.rst': 'restructuredtext', '.md': 'myst-nb',
                 '.ipynb': 'myst-nb'}
exclude_patterns = ['_build', 'README.md', '**.ipynb_checkpoints']

templates_path = ['_templates']
autosummary_generate = True
autodoc_typehints = 'description'
autodoc_member_order = 'bysource'
napoleon_google_docstring = True
napoleon_numpy_docstring = False
# Attributes: sections as fields, so dataclass fields are not described twice.
napoleon_use_ivar = True

html_theme = 'sphinx_book_theme'
html_title = 'tcn_jax'
html_theme_options = {'repository_url': REPOSITORY, 'use_repository_button': True,
                      'show_toc_level': 2}

# A reference to a tcn_jax name that has no entry fails the build (-W); names
# of other libraries (no intersphinx here: it cannot fetch) are not checked.
nitpicky = True
nitpick_ignore_regex = [(r'py:.*', r'(?!tcn_jax\.).*')]
# train_students' keyword types live in tcn_jax.students, which has no API
# page of its own (its docstring describes them).
nitpick_ignore = [('py:class', f'tcn_jax.students.{name}')
                  for name in ('Optimizer', 'Nets', 'Objective')]
