"""Sphinx configuration of flatfast's documentation site.

Build it with ``.ci/docs`` (or ``sphinx-build -W -b html docs docs/_build/html``): warnings are errors, the
examples gallery runs every example, and the results pages' tables -- generated into the pages from the stored
measurements in docs/results/ by bench/results_pages.py -- are checked against the data before the pages are
read.
"""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "bench"))
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

import flatfast  # noqa: E402
import results_pages  # noqa: E402

project = "flatfast"
author = "the flatfast developers"
copyright = "2026, the flatfast developers"
release = version = flatfast.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "numpydoc",
    "myst_parser",
    "sphinx_gallery.gen_gallery",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build", "results/README.md", "results/*/README.md", "auto_examples/*.ipynb",
                    "auto_examples/*.py", "auto_examples/*.zip", "auto_examples/*.md5", "auto_examples/*.json",
                    "examples/README.txt"]
myst_enable_extensions = ["dollarmath", "colon_fence"]
myst_heading_anchors = 3

autosummary_generate = True
autodoc_typehints = "none"  # numpydoc's parameter lists carry the types
autodoc_default_options = {"members": False}
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
numpydoc_validation_checks = set()  # the reference is checked by its doctests (tests/test_docs.py), not by style rules
nitpicky = False

sphinx_gallery_conf = {
    "examples_dirs": "examples",
    "gallery_dirs": "auto_examples",
    "filename_pattern": r"/plot_",
    "download_all_examples": False,
    "remove_config_comments": True,
    "min_reported_time": 1,
    "abort_on_example_error": True,
}

html_theme = "pydata_sphinx_theme"
html_title = f"flatfast {version}"
html_static_path = []
html_theme_options = {
    "navigation_depth": 2,
    "show_prev_next": False,
    "secondary_sidebar_items": ["page-toc"],
    "footer_start": ["copyright"],
    "footer_end": [],
}
html_sidebars = {"**": ["sidebar-nav-bs"]}


def _check_results(app):
    """The results pages carry their generated tables (so that they read on GitHub too); a page whose tables no
    longer match its stored data fails the build (-W) with the command that regenerates them."""
    from sphinx.util import logging

    for page, table in results_pages.stale_tables(os.path.join(HERE, "results")):
        logging.getLogger(__name__).warning(f"results/{page}: the table {table} differs from the stored data; run "
                                            "python bench/results_pages.py")


def setup(app):
    app.connect("builder-inited", _check_results)
