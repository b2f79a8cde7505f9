"""Versions recorded in saved models, and what happens when they differ on load."""

from __future__ import annotations

import warnings

import torch

from sk_padim._version import __version__

__all__ = [
    "OldFormatError",
    "STATE_FORMAT",
    "VersionMismatchWarning",
    "VersionedPickleMixin",
    "check_state_format",
    "current_versions",
    "warn_if_versions_differ",
]

STATE_FORMAT = 4
"""The layout of the estimators' fitted state and of the package's modules (format 4: the torch
core in ``sk_padim.core``, a detector's Gaussians in ``FittedGaussians``); files of another
layout must be refitted."""


class VersionMismatchWarning(UserWarning):
    """A model was saved with another major.minor version of sk-padim or torch."""


class OldFormatError(ValueError):
    """A model was saved in an earlier development format of sk-padim: refit it."""


def current_versions() -> dict[str, str]:
    return {"sk_padim": __version__, "torch": torch.__version__}


def _major_minor(version: str) -> tuple[str, ...]:
    """``("2", "14")`` of ``"2.14.1+cu130"``: the part whose change may change results."""
    return tuple(version.split("+")[0].split(".")[:2])


def warn_if_versions_differ(saved: dict, what: str) -> None:
    """Warn when ``saved`` versions (``current_versions()`` of the writer) differ in
    major.minor from this process's; ``what`` names the model in the message."""
    for package, version in current_versions().items():
        old = saved.get(package)
        if isinstance(old, str) and _major_minor(old) != _major_minor(version):
            warnings.warn(
                f"{what} was saved with {package} {old} and is loaded with {version}; "
                f"results may differ. Refit it, or install {package}=={old}.",
                VersionMismatchWarning,
                stacklevel=3,
            )


def check_state_format(saved_format, what: str) -> None:
    """Raise :class:`OldFormatError` unless ``saved_format`` is :data:`STATE_FORMAT`."""
    if saved_format != STATE_FORMAT:
        raise OldFormatError(
            f"{what} was saved by an earlier development version of sk-padim (state format "
            f"{saved_format or 1}, this version reads {STATE_FORMAT}); refit it and save it again."
        )


class VersionedPickleMixin:
    """Record versions and the state format when pickling; check them on load."""

    def __getstate__(self):
        # A copy: BaseEstimator's state may be the object's own __dict__, which subclasses
        # edit (dropping caches) and this adds to; pickling must leave the object as it is.
        state = dict(super().__getstate__())
        state["_saved_versions"] = current_versions()
        state["_state_format"] = STATE_FORMAT
        return state

    def __setstate__(self, state):
        what = f"This {type(self).__name__}"
        if any(name.endswith("_") and not name.startswith("_") for name in state):
            check_state_format(state.get("_state_format"), what)  # fitted: check the layout
        warn_if_versions_differ(state.get("_saved_versions", {}), what)
        super().__setstate__(state)
