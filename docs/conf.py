"""Sphinx configuration of the sk-padim documentation site.

Build it (offline, warnings are errors) from the repository root::

    pip install -e ".[docs]"
    python -m sphinx -W -b html docs docs/_build/html

- The user guide is the Markdown pages of docs/, read by myst-parser.
- The API reference (api.rst) is generated from the docstrings by autosummary and
  numpydoc, whose validation runs on every documented object (checks below).
- The gallery is examples/, run by sphinx-gallery at build time on the built-in
  defect textures (no download), at the small size the tests use.
- No intersphinx: the build must work without a network. References to other
  projects' objects (numpy, scikit-learn, torch ...) therefore cannot resolve and are
  exempted from nitpicky mode below; every reference to sk-padim must resolve.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import io
import os
import re
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(DOCS / "sphinxext"))  # sk_padim_gallery

os.environ.setdefault("MPLBACKEND", "Agg")
# argparse wraps the command-line help to this width (the command-line page).
os.environ["COLUMNS"] = "100"

import sk_padim  # noqa: E402  (after the environment above)

# -- Project ----------------------------------------------------------------------------

project = "sk-padim"
author = "sk-padim developers"
copyright = "sk-padim developers"  # noqa: A001
version = release = sk_padim.__version__

# -- General ----------------------------------------------------------------------------

extensions = [
    "myst_parser",
    "numpydoc",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.mathjax",
    "sphinx_gallery.gen_gallery",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
templates_path = ["_templates"]
exclude_patterns = [
    "_build",
    "_static",
    # Raw benchmark tables and JSON, linked from performance.md, not pages of the site.
    "benchmark-results",
    # sphinx-gallery writes these beside the pages; they are downloads, not sources.
    "auto_examples/*.ipynb",
    "auto_examples/*.py",
    "auto_examples/*.zip",
    "auto_examples/*.json",
    "auto_examples/*.md5",
    "auto_examples/*.codeobj.json",
]
# Sphinx's language, for its search index.
language = "en"

# Every cross-reference must resolve (-W turns a broken one into an error) ...
nitpicky = True
# ... except references to other projects' objects: without a network there is no
# intersphinx inventory to resolve them with. numpydoc and autodoc produce such
# references from "See Also" sections and from types written as ``:class:`...```.
_EXTERNAL = (
    r"(numpy|np|scipy|sklearn|skimage|torch|torchvision|joblib|dask|distributed|PIL|onnx"
    r"|onnxruntime|matplotlib|pathlib|os|io|collections|typing|concurrent|threading"
    r"|argparse|tempfile)(\..*)?"
)
nitpick_ignore_regex = [
    (r"py:.*", _EXTERNAL),
    # Python's built-in types and names (str, int, Path, ArrayLike ...) written as
    # targets in docstrings.
    (
        r"py:.*",
        r"(str|int|float|bool|bytes|list|tuple|dict|set|None|object|callable"
        r"|Callable|Sequence|Iterable|Iterator|Mapping|Path|PathLike|ArrayLike|NDArray"
        r"|Module|Tensor|Pipeline|Bunch|Client|Future|Figure|Axes|Memory)",
    ),
]

# -- Markdown (myst-parser) ------------------------------------------------------------

# Anchors for the headings, so that links such as ``scale_out.md#partitions-...``
# resolve.
myst_heading_anchors = 4
myst_enable_extensions = ["colon_fence", "deflist"]

# -- API reference: autodoc, autosummary, numpydoc -------------------------------------

autosummary_generate = True
autosummary_imported_members = False
autodoc_default_options = {"members": True}
# Types are in the numpydoc "Parameters" and "Returns" sections; signatures stay short
# and never hold references to other projects' classes.
autodoc_typehints = "none"
autodoc_member_order = "groupwise"
add_module_names = False

numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
numpydoc_attributes_as_param_list = True
numpydoc_xref_param_type = False

# numpydoc validation: every check of the numpydoc standard on every documented
# object, less these, each for a stated reason:
numpydoc_validation_checks = {
    "all",
    # GL01: the project (like PEP 257 and ruff) starts the summary on the line of the
    # opening quotes.
    "GL01",
    # ES01: a one-line summary is enough for many functions; no extended summary needed.
    "ES01",
    # SA01: "See Also" only where there is a related name worth following.
    "SA01",
    # RT02: a single return value is named, as in scikit-learn (``self : object``).
    "RT02",
    # EX01: "Examples" sections are wanted on the main public names (and run as doctests
    # where present), but helpers such as check_matplotlib do not each need one.
    "EX01",
}
# Objects not validated: scikit-learn's metadata-routing methods, generated on every
# estimator with scikit-learn's own docstrings; private names; constants.
numpydoc_validation_exclude = {
    r"\.set_\w+_request$",
    r"\.get_metadata_routing$",
    r"\._[a-z]\w*$",
    # A constant (a tuple): numpydoc validates the tuple type's own docstring, not the
    # attribute's, which autodoc shows.
    r"\.IMAGE_SUFFIXES$",
}

# -- Gallery (sphinx-gallery) ----------------------------------------------------------

# Examples that cannot run on the build machine (a GPU, a network, a dataset on disk)
# are shown, not executed: name them here, with the reason in the example's text.
# Every example in examples/ runs offline on the CPU today.
NOT_EXECUTED: tuple[str, ...] = ()


def _executed_pattern(not_executed: tuple[str, ...]) -> str:
    """The filename_pattern that runs every example except those named."""
    if not not_executed:
        return r"/[^/]+\.py$"
    names = "|".join(re.escape(name) for name in not_executed)
    return rf"/(?!(?:{names})$)[^/]+\.py$"


sphinx_gallery_conf = {
    "examples_dirs": str(ROOT / "examples"),
    "gallery_dirs": "auto_examples",
    "filename_pattern": _executed_pattern(NOT_EXECUTED),
    "ignore_pattern": r"__init__\.py",
    "within_subsection_order": "sk_padim_gallery.ExampleOrder",
    "download_all_examples": False,
    "remove_config_comments": True,
    "plot_gallery": "True",
    # A failing example fails the build.
    "only_warn_on_example_error": False,
    "abort_on_example_error": False,
    # "Examples using X" on the API pages.
    "doc_module": ("sk_padim",),
    "backreferences_dir": "generated/backreferences",
    "reference_url": {"sk_padim": None},
    "inspect_global_variables": False,
    "capture_repr": (),
    "matplotlib_animations": False,
    "image_scrapers": ("matplotlib",),
    "reset_modules": ("matplotlib", "sk_padim_gallery.example_size"),
    "reset_modules_order": "before",
    "show_memory": False,
    "show_signature": False,
    "min_reported_time": 10,
}

# -- HTML -------------------------------------------------------------------------------

html_theme = "pydata_sphinx_theme"
html_title = f"sk-padim {release}"
# Only the stylesheet: docs/_static/screenshots/ are pictures of the site for the
# repository, not part of it.
html_static_path = ["_static/css"]
html_css_files = ["sk_padim.css"]
html_theme_options = {
    "navbar_align": "left",
    "show_toc_level": 2,
    "navigation_with_keys": False,
    "header_links_before_dropdown": 6,
    "secondary_sidebar_items": ["page-toc", "sourcelink"],
    "footer_start": ["copyright"],
    "footer_end": ["sphinx-version", "theme-version"],
}
html_show_sourcelink = True
html_copy_source = True
html_last_updated_fmt = None

# -- The command-line page: `sk-padim ... --help`, generated at build time -------------


def _cli_help(argv: list[str]) -> str:
    """What ``sk-padim ARGV`` prints (argparse's help, which exits)."""
    from sk_padim import cli

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        cli.main(argv)
    return out.getvalue().rstrip() + "\n"


def _cli_commands(top_help: str) -> list[str]:
    """The sub-commands listed in the command's help (``    fit    Fit ...`` lines)."""
    listing = top_help.split("<command>", 2)[-1]
    return re.findall(r"^ {4}([a-z][a-z-]*)(?: {2,}|\n)", listing, flags=re.MULTILINE)


def write_cli_help(app) -> None:
    """Write the help of the command and of each sub-command under generated/cli/."""
    folder = DOCS / "generated" / "cli"
    folder.mkdir(parents=True, exist_ok=True)
    top = _cli_help(["--help"])
    (folder / "sk-padim.txt").write_text(top)
    commands = _cli_commands(top)
    if not commands:
        raise RuntimeError("no sub-command found in 'sk-padim --help'")
    index = []
    for command in commands:
        (folder / f"{command}.txt").write_text(_cli_help([command, "--help"]))
        title = f"``sk-padim {command}``"
        index += [
            title,
            "-" * len(title),
            "",
            f".. literalinclude:: /generated/cli/{command}.txt",
            "   :language: none",
            "",
        ]
    (folder / "commands.rst.inc").write_text("\n".join(index))


def skip_member(app, what, name, obj, skip, options):
    """Leave scikit-learn's generated metadata-routing methods out of the pages, and
    members inherited from other libraries (scikit-learn's mixins, ``nn.Module``): the
    class template documents inherited members for those sk-padim's classes share."""
    if re.fullmatch(r"set_\w+_request|get_metadata_routing", name):
        return True
    module = getattr(inspect.unwrap(obj), "__module__", None) if callable(obj) else None
    if what == "class" and module is not None and not module.startswith("sk_padim"):
        return True
    return None


def _python_object(dotted: str):
    """The object a dotted name gives by import and attribute access, or None."""
    parts = dotted.split(".")
    for split in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        try:
            for attribute in parts[split:]:
                obj = getattr(obj, attribute)
        except AttributeError:
            return None
        return obj
    return None


def public_name(app, env, node, contnode):
    """Resolve a reference to an object by the public name it is documented under.

    The API reference documents re-exported objects under their public names
    (``sk_padim.save_npz``), while docstrings may name them as their module sees them
    (``save_npz`` inside ``sk_padim.persistence``, ``sk_padim.metrics.pixel_auroc_scorer``,
    ``PadimDetector.merge`` inside ``sk_padim.dask``). A reference that Python resolves
    to the very object documented under another name (same last one or two components)
    links there; any other unresolved reference stays a warning.
    """
    if node.get("refdomain") != "py":
        return None
    target = node["reftarget"].lstrip(".~")
    module, cls = node.get("py:module"), node.get("py:class")
    scopes = [f"{module}.{cls}." if module and cls else None, f"{module}." if module else None]
    original = None
    for prefix in [*filter(None, scopes), ""]:
        original = _python_object(prefix + target)
        if original is not None:
            break
    if original is None:
        return None
    domain = env.get_domain("py")
    parts = target.split(".")
    for k in (1, 2):
        tail = "." + ".".join(parts[-k:])
        for candidate in sorted(name for name in domain.objects if name.endswith(tail)):
            if _python_object(candidate) is original:
                return domain.resolve_xref(
                    env, node["refdoc"], app.builder, node["reftype"], candidate, node, contnode
                )
    return None


def setup(app):
    app.connect("missing-reference", public_name)
    app.connect("builder-inited", write_cli_help)
    app.connect("autodoc-skip-member", skip_member)
