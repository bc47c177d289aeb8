"""Classifier two-sample test as sbibm defines it (Lueckmann et al. 2021), with scikit-learn.

For each pair of files given (reference samples, then samples to test), the first
`--dim` columns of each: both sets z-scored with the reference samples' mean and
unbiased standard deviation; an `MLPClassifier` of two ReLU layers of 10·dim units
(Adam, at most 10 000 iterations, seeded) tells them apart; the score is its accuracy
under 5-fold shuffled cross-validation. 0.5: the classifier cannot tell the sets apart;
1: it always can. Prints one accuracy per pair.
"""

import argparse

import numpy as np
from sklearn.model_selection import KFold, cross_val_score
from sklearn.neural_network import MLPClassifier


def c2st(x, y, seed=1, folds=5):
    mean, std = x.mean(axis=0), x.std(axis=0, ddof=1)
    x, y = (x - mean) / std, (y - mean) / std
    dim = x.shape[1]
    clf = MLPClassifier(
        activation="relu",
        hidden_layer_sizes=(10 * dim, 10 * dim),
        max_iter=10_000,
        solver="adam",
        random_state=seed,
    )
    data = np.concatenate((x, y))
    target = np.concatenate((np.zeros(len(x)), np.ones(len(y))))
    cv = KFold(n_splits=folds, shuffle=True, random_state=seed)
    return float(np.mean(cross_val_score(clf, data, target, cv=cv, scoring="accuracy")))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dim", type=int, required=True)
    ap.add_argument("pairs", nargs="+", help="reference.csv samples.csv, repeated")
    a = ap.parse_args()
    if len(a.pairs) % 2:
        raise SystemExit("c2st.py: give files in pairs (reference, samples)")
    for ref, test in zip(a.pairs[::2], a.pairs[1::2]):
        load = lambda p: np.loadtxt(p, delimiter=",", skiprows=1, ndmin=2)[:, : a.dim]
        print(f"{c2st(load(ref), load(test)):.4f}", flush=True)


if __name__ == "__main__":
    main()
