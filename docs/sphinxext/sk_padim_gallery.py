"""How sphinx-gallery runs and orders the examples (named in docs/conf.py).

A module of its own, not conf.py, so that Sphinx can pickle the configuration that
names these callables.

The examples read ``SK_PADIM_EXAMPLES_SMALL`` when they start: set, they run at the small
size the tests use (64 px images, fewer images and candidates). The gallery runs each at
its full size except those named in ``SMALL_IN_GALLERY``, so that the whole site builds
in a few minutes on 2 CPU cores. ``SK_PADIM_EXAMPLES_SMALL=1`` in the build's
environment runs them all small.
"""

import os

SMALL_IN_GALLERY = ("grid_search_memory.py", "mvtec_evaluation.py")
_SMALL_GIVEN = os.environ.get("SK_PADIM_EXAMPLES_SMALL")

# The order of the gallery: from a first fit to deployment; others after, by name.
ORDER = (
    "quickstart.py",
    "calibration.py",
    "custom_backbone.py",
    "grid_search_memory.py",
    "mvtec_evaluation.py",
    "export_onnx.py",
)


def example_size(gallery_conf, fname, when):
    """Set SK_PADIM_EXAMPLES_SMALL before each example, as SMALL_IN_GALLERY says."""
    if when != "before" or fname is None or _SMALL_GIVEN is not None:
        return
    if os.path.basename(fname) in SMALL_IN_GALLERY:
        os.environ["SK_PADIM_EXAMPLES_SMALL"] = "1"
    else:
        os.environ.pop("SK_PADIM_EXAMPLES_SMALL", None)


class ExampleOrder:
    """Sort key of the examples of a gallery folder: ``ORDER``, then by file name."""

    def __init__(self, src_dir):
        self.src_dir = src_dir

    def __call__(self, filename):
        name = os.path.basename(filename)
        return (ORDER.index(name) if name in ORDER else len(ORDER), name)

    def __repr__(self):
        return f"<{type(self).__name__}: {', '.join(ORDER)}>"
