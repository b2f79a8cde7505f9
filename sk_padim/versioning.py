"""Versions recorded in pickled models, and the warning when they differ on load."""

from __future__ import annotations

import warnings

import torch

from sk_padim._version import __version__


class VersionMismatchWarning(UserWarning):
    """A model was pickled with another major.minor version of sk-padim or torch."""


def current_versions() -> dict[str, str]:
    return {"sk_padim": __version__, "torch": torch.__version__}


def major_minor(version: str) -> tuple[str, ...]:
    """``("2", "14")`` of ``"2.14.1+cu130"``: the part whose change may change results."""
    return tuple(version.split("+")[0].split(".")[:2])


class VersionedPickleMixin:
    """Record sk-padim's and torch's versions when pickling; warn on a mismatch on load."""

    def __getstate__(self):
        # A copy: BaseEstimator's state may be the object's own __dict__, which subclasses
        # edit (dropping caches) and this adds to; pickling must leave the object as it is.
        state = dict(super().__getstate__())
        state["_saved_versions"] = current_versions()
        return state

    def __setstate__(self, state):
        saved = state.get("_saved_versions", {})
        for package, version in current_versions().items():
            old = saved.get(package)
            if old is not None and major_minor(old) != major_minor(version):
                warnings.warn(
                    f"This {type(self).__name__} was saved with {package} {old} and is "
                    f"loaded with {version}; results may differ. Refit it, or install "
                    f"{package}=={old}.",
                    VersionMismatchWarning,
                    stacklevel=2,
                )
        super().__setstate__(state)
