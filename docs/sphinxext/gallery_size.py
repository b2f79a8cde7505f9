"""The size at which sphinx-gallery runs each example (docs/conf.py's reset_modules).

The examples read ``SK_PADIM_EXAMPLES_SMALL`` when they start: set, they run at the small
size the tests use (64 px images, fewer candidates). The gallery runs each at its full
size except those named in ``SMALL_IN_GALLERY``, so that the whole site builds in a few
minutes on 2 CPU cores. ``SK_PADIM_EXAMPLES_SMALL=1`` in the build's environment runs
them all small. A module of its own (not conf.py) so that Sphinx can pickle the
configuration that names it.
"""

import os

SMALL_IN_GALLERY = ("grid_search_memory.py", "mvtec_evaluation.py")
_SMALL_GIVEN = os.environ.get("SK_PADIM_EXAMPLES_SMALL")


def example_size(gallery_conf, fname, when):
    """Set SK_PADIM_EXAMPLES_SMALL before each example, as SMALL_IN_GALLERY says."""
    if when != "before" or fname is None or _SMALL_GIVEN is not None:
        return
    if os.path.basename(fname) in SMALL_IN_GALLERY:
        os.environ["SK_PADIM_EXAMPLES_SMALL"] = "1"
    else:
        os.environ.pop("SK_PADIM_EXAMPLES_SMALL", None)
