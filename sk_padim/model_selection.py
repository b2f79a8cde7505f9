"""Cross-validation for detectors trained on normal images only."""

from collections.abc import Iterator

import numpy as np
from numpy.typing import ArrayLike, NDArray
from sklearn.model_selection import BaseCrossValidator, KFold

from sk_padim._checks import image_labels

__all__ = ["NormalTrainSplit"]


class NormalTrainSplit(BaseCrossValidator):
    """K-fold splits whose training folds hold only normal images.

    The normal images (label 0, or an empty mask) are split into ``n_splits`` folds
    as :class:`sklearn.model_selection.KFold` would split them. Each split trains on
    all normal folds but one; its test fold holds that held-out normal fold **plus
    every anomalous image**.

    Anomalous images go to every test fold, not spread across folds, because:

    - they are never trained on, so reusing them leaks nothing into any fit;
    - every test fold then holds both classes as soon as there is one anomalous image,
      so AUROC and AUPRO are defined on each fold even with few anomalies (a defect set
      of 3 images cannot be spread over 5 folds);
    - every candidate of a grid search is scored on all the anomalous evidence,
      which makes the ranking of candidates less noisy.

    The price: the test folds overlap (they share the anomalies), so they are not a
    partition (``cross_val_predict`` refuses them) and fold scores are correlated;
    their spread understates the uncertainty of the mean score.

    Parameters
    ----------
    n_splits : int, default=5
        Number of folds of the normal images; at least 2, at most the number of
        normal images.
    shuffle : bool, default=False
        Whether to shuffle the normal images before splitting them into folds.
    random_state : int, RandomState instance or None, default=None
        Seeds the shuffle; only allowed with ``shuffle=True``, as in ``KFold``.

    See Also
    --------
    sklearn.model_selection.KFold : How the normal images are split.
    sk_padim.metrics.pixel_auroc_scorer : A scorer to use with these splits.

    Examples
    --------
    >>> import numpy as np
    >>> from sk_padim import NormalTrainSplit
    >>> y = np.array([0, 0, 1, 0, 0, 1])
    >>> for train, test in NormalTrainSplit(n_splits=2).split(np.zeros(6), y):
    ...     print(train, test)
    [3 4] [0 1 2 5]
    [0 1] [2 3 4 5]
    """

    def __init__(self, n_splits: int = 5, *, shuffle: bool = False, random_state=None):
        self.n_splits = n_splits
        self.shuffle = shuffle
        self.random_state = random_state
        self._normal_folds()  # raise on bad parameters now, as scikit-learn splitters do

    def split(
        self, X: ArrayLike, y: ArrayLike | None = None, groups: ArrayLike | None = None
    ) -> Iterator[tuple[NDArray[np.intp], NDArray[np.intp]]]:
        """Generate train and test indices.

        Parameters
        ----------
        X : array-like of shape (n, ...)
            The images (or features); only their number is used.
        y : array-like of shape (n,) or (n, H, W)
            Image labels (1 = anomalous) or pixel masks (an image with a non-empty mask
            is anomalous). Required.
        groups : None
            Ignored; present for API compatibility.

        Returns
        -------
        splits : iterator of (ndarray, ndarray)
            Per split, ``(train, test)``: the indices of the normal images to fit on,
            and of the held-out normal images and all anomalous images.
        """
        if y is None:
            raise ValueError(
                "NormalTrainSplit needs y to tell normal from anomalous images: pass image "
                "labels (n,) or pixel masks (n, H, W), e.g. GridSearchCV(...).fit(X, y)."
            )
        return super().split(X, y, groups)

    def get_n_splits(self, X=None, y=None, groups=None) -> int:
        """Number of splits, ``n_splits``.

        Parameters
        ----------
        X, y, groups : object
            Ignored; present for API compatibility.

        Returns
        -------
        int
            ``n_splits``.
        """
        return self.n_splits

    def _iter_test_masks(self, X, y, groups=None) -> Iterator[NDArray[np.bool_]]:
        labels = image_labels(y)
        normal = np.flatnonzero(~labels)
        folds = self._normal_folds()
        if not labels.any():
            raise ValueError(
                "y holds no anomalous image, so no test fold could be scored with AUROC or "
                "AUPRO. Add anomalous images (label 1, or a non-empty mask) to X and y."
            )
        if normal.size < self.n_splits:
            raise ValueError(
                f"n_splits={self.n_splits} is more than the {normal.size} normal images in y; "
                "each fold needs at least one. Lower n_splits or add normal images."
            )
        for _, held_out in folds.split(normal):
            test = labels.copy()
            test[normal[held_out]] = True
            yield test

    def _normal_folds(self) -> KFold:
        return KFold(self.n_splits, shuffle=self.shuffle, random_state=self.random_state)
