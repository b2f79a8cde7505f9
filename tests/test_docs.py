"""The documentation site's sources agree with the package (no Sphinx needed).

The API reference, docs/api.rst, lists names by hand so that they are grouped the way a
user looks for them; these tests make that list fail loudly when a public name is added,
renamed or removed. The site itself is built by .ci/run (``sphinx -W``).
"""

import importlib
import importlib.util
import re
import sys
from pathlib import Path

import pytest

import sk_padim

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    tomllib = None


def full_name(module: str | None, entry: str) -> str:
    """An entry's full name under ``currentmodule`` ``module`` (``None``: none)."""
    if module in (None, "None") or entry.startswith(f"{module}."):
        return entry
    return f"{module}.{entry}"


def documented_names(text: str) -> list[str]:
    """Full names listed in autosummary tables and ``py:data`` directives of ``text``.

    An autosummary entry is relative to the ``currentmodule`` above it, as Sphinx reads
    it.
    """
    names = []
    module = None
    in_autosummary = False
    for line in text.splitlines():
        if match := re.match(r"\.\. (?:py:)?currentmodule:: (\S+)", line):
            module = match.group(1)
            in_autosummary = False
        elif re.match(r"\.\. autosummary::", line):
            in_autosummary = True
        elif match := re.match(r"\.\. (?:py:)?data:: (\S+)", line):
            names.append(full_name(module, match.group(1)))
            in_autosummary = False
        elif in_autosummary:
            entry = line.strip()
            if not line.startswith(" ") and entry:
                in_autosummary = False  # the block ended
            elif entry and not entry.startswith(":"):
                names.append(full_name(module, entry))
    return names


API = documented_names((DOCS / "api.rst").read_text())


def is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ImportError:
        return False


# The modules listed, and those whose names are listed.
DOCUMENTED_MODULES = sorted(
    ({name.rpartition(".")[0] for name in API} | {name for name in API if is_module(name)})
    - {"sk_padim"}
)


def resolve(full_name: str):
    """The object a full dotted name names, importing modules as needed."""
    parts = full_name.split(".")
    for split in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        for attribute in parts[split:]:
            obj = getattr(obj, attribute)
        return obj
    raise ImportError(full_name)


def test_the_parser_reads_autosummary_tables():
    text = """
.. currentmodule:: pkg

.. autosummary::
   :toctree: generated/

   One
   pkg.sub

.. currentmodule:: pkg.sub

.. autosummary::

   two

Prose.

.. py:data:: __version__

.. currentmodule:: None

.. autosummary::

   pkg.other
"""
    assert documented_names(text) == [
        "pkg.One",
        "pkg.sub",
        "pkg.sub.two",
        "pkg.sub.__version__",
        "pkg.other",
    ]


def test_every_name_of_the_package_is_in_the_api_reference():
    missing = sorted(set(sk_padim.__all__) - {n.removeprefix("sk_padim.") for n in API})
    assert not missing, f"add to docs/api.rst (under '.. currentmodule:: sk_padim'): {missing}"


@pytest.mark.parametrize("module_name", DOCUMENTED_MODULES)
def test_every_name_of_a_documented_module_is_in_the_api_reference(module_name):
    module = importlib.import_module(module_name)
    missing = []
    for name in getattr(module, "__all__", ()):
        reexported = getattr(sk_padim, name, None) is getattr(module, name)
        if f"{module_name}.{name}" not in API and not (reexported and f"sk_padim.{name}" in API):
            missing.append(name)
    assert not missing, f"add to docs/api.rst (under '.. currentmodule:: {module_name}'): {missing}"


def test_every_name_in_the_api_reference_exists():
    for name in API:
        resolve(name)  # raises for a name that is gone


def test_no_name_is_listed_twice():
    assert len(API) == len(set(API))


def test_every_user_guide_page_is_in_the_site():
    toctrees = "\n".join(path.read_text() for path in DOCS.glob("*.rst"))
    listed = set(re.findall(r"^   ([\w/]+)$", toctrees, flags=re.MULTILINE))
    pages = {path.stem for path in DOCS.glob("*.md")}
    assert pages <= listed, f"add to a toctree (docs/user_guide.rst): {sorted(pages - listed)}"


@pytest.mark.skipif(tomllib is None, reason="tomllib needs Python 3.11")
def test_the_docs_extra_installs_what_the_build_uses():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extra = " ".join(project["optional-dependencies"]["docs"])
    for package in ("sphinx", "myst-parser", "pydata-sphinx-theme", "sphinx-gallery", "numpydoc"):
        assert re.search(rf"(^|\s){re.escape(package)}\b", extra), package
    for extra_name in ("lite", "plot", "dask", "export"):  # what the examples and API use
        assert re.search(rf"sk-padim\[[^]]*\b{extra_name}\b", extra), extra_name
