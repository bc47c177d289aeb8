"""Classifier two-sample test as sbibm defines it (Lueckmann et al. 2021), with scikit-learn.

For each pair of files given (reference samples, then samples to test), the first
`--dim` columns of each: both sets z-scored with the reference samples' mean and
unbiased standard deviation; an `MLPClassifier` of two ReLU layers of 10·dim units
(Adam, at most 10 000 iterations, seeded) tells them apart; the score is its accuracy
under 5-fold shuffled cross-validation. 0.5: the classifier cannot tell the sets apart;
1: it always can. Prints one accuracy per pair.

Every fold of every pair is an independent fit, so they run as separate processes
(`--jobs`, default one per core): the same folds and the same seeded classifiers as a
serial `cross_val_score`, in less wall time.
"""

import argparse
import os

import numpy as np
from joblib import Parallel, delayed
from sklearn.base import clone
from sklearn.model_selection import KFold
from sklearn.neural_network import MLPClassifier

FOLDS = 5
SEED = 1


def prepare(x, y):
    """Both sets z-scored by the reference `x`; the data, its labels, the classifier."""
    mean, std = x.mean(axis=0), x.std(axis=0, ddof=1)
    x, y = (x - mean) / std, (y - mean) / std
    dim = x.shape[1]
    clf = MLPClassifier(
        activation="relu",
        hidden_layer_sizes=(10 * dim, 10 * dim),
        max_iter=10_000,
        solver="adam",
        random_state=SEED,
    )
    data = np.concatenate((x, y))
    target = np.concatenate((np.zeros(len(x)), np.ones(len(y))))
    return data, target, clf


def fold_accuracy(clf, data, target, train, test):
    """The accuracy on one held-out fold of a fresh copy of `clf` fitted on the rest."""
    return clone(clf).fit(data[train], target[train]).score(data[test], target[test])


def positive(text):
    """A whole number of at least 1, for argparse."""
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dim", type=int, required=True)
    ap.add_argument(
        "--jobs",
        type=positive,
        default=os.cpu_count() or 1,
        help="folds fitted at once, each in its own process (default: one per core)",
    )
    ap.add_argument("pairs", nargs="+", help="reference.csv samples.csv, repeated")
    a = ap.parse_args()
    if len(a.pairs) % 2:
        raise SystemExit("c2st.py: give files in pairs (reference, samples)")
    load = lambda p: np.loadtxt(p, delimiter=",", skiprows=1, ndmin=2)[:, : a.dim]
    problems = [prepare(load(r), load(t)) for r, t in zip(a.pairs[::2], a.pairs[1::2])]
    cv = KFold(n_splits=FOLDS, shuffle=True, random_state=SEED)
    work = [
        (p, train, test)
        for p, (data, _, _) in enumerate(problems)
        for train, test in cv.split(data)
    ]
    accuracy = Parallel(n_jobs=a.jobs)(
        delayed(fold_accuracy)(problems[p][2], problems[p][0], problems[p][1], train, test)
        for p, train, test in work
    )
    for p in range(len(problems)):
        folds = [acc for (q, _, _), acc in zip(work, accuracy) if q == p]
        print(f"{float(np.mean(folds)):.4f}", flush=True)


if __name__ == "__main__":
    main()
