"""Cross-validation fold assignment."""

from __future__ import annotations

import numpy as np

from pipeline.infra.errors import ConfigError


def fold_indices(
    labels: np.ndarray, *, folds: int, seed: int, shuffle: bool, stratified: bool
) -> list[tuple[np.ndarray, np.ndarray]]:
    """`folds` (train, validation) index pairs over `labels` (N,): every sample is held out
    exactly once. scikit-learn's KFold, or StratifiedKFold (each fold keeps the class
    proportions) when `stratified`; samples are shuffled with `seed` when `shuffle`.

    Raises ConfigError naming `folds` when some fold would get no sample to score on (more folds
    than samples, or than samples of the smallest class when stratified).
    """
    from sklearn.model_selection import KFold, StratifiedKFold

    smallest = len(labels)
    if stratified:
        # Samples of the smallest class present (min's `initial` only covers empty `labels`).
        smallest = int(np.unique(labels, return_counts=True)[1].min(initial=len(labels)))
    if folds > smallest:
        what = "the smallest class" if stratified else "the training set"
        raise ConfigError(
            f"folds={folds} is more than {what} has samples ({smallest}). "
            f"Fix: use folds<={smallest}"
        )
    splitter_class = StratifiedKFold if stratified else KFold
    splitter = splitter_class(folds, shuffle=shuffle, random_state=seed if shuffle else None)
    return list(splitter.split(np.zeros(len(labels)), labels))


def repeated_fold_indices(
    labels: np.ndarray, *, folds: int, repeats: int, seed: int, shuffle: bool, stratified: bool
) -> list[tuple[int, int, np.ndarray, np.ndarray]]:
    """(repeat, fold, train, validation) for `repeats` fold assignments (both numbered from 1),
    each a partition as fold_indices'. scikit-learn's RepeatedKFold / RepeatedStratifiedKFold,
    seeded with `seed`: repeat 1 is fold_indices' assignment, later repeats reshuffle. Repeats
    need `shuffle` (ValueError otherwise: they would all be the same folds)."""
    from sklearn.model_selection import RepeatedKFold, RepeatedStratifiedKFold

    once = fold_indices(labels, folds=folds, seed=seed, shuffle=shuffle, stratified=stratified)
    if repeats == 1:
        return [(1, k, train, val) for k, (train, val) in enumerate(once, start=1)]
    if not shuffle:
        raise ValueError("repeated k-fold needs shuffle=True: unshuffled repeats are equal")
    splitter_class = RepeatedStratifiedKFold if stratified else RepeatedKFold
    splitter = splitter_class(n_splits=folds, n_repeats=repeats, random_state=seed)
    splits = splitter.split(np.zeros(len(labels)), labels)
    return [(i // folds + 1, i % folds + 1, train, val) for i, (train, val) in enumerate(splits)]
