"""Drift detection on real data: scikit-learn's digits, shifted three ways, and clean held-out splits.

Per seed the 1,797 digits are split at random (stratified) into train 50% / verification 25% / held-out
25%; a logistic regression (the build's ``digits_logreg`` pipeline) is trained, and the reference profile
is made from the verification split and the model's probabilities on it — what the build stores beside
the manifest. Then ``tritonforge.observe.drift.compare`` judges, each with the model's outputs on it:

- clean: the held-out split as it is (any flag is a false positive);
- brightness: held-out pixels x 1.3 + 1, clipped to 0-16 (a brighter scanner);
- noise: held-out pixels + N(0, 2), clipped to 0-16 (a noisier sensor);
- writers: a different writer population — the digits carry no writer ids, so it is approximated by
  style: within each digit, the held-out images are split in two by k-means (k=2) and only one style
  cluster is sent (the cluster further from the reference's mean image of that digit);
- classes: only the digits 0-4 (the same writers and scanner, a different class mix);
- priors: every digit still present, 0s and 1s three times as frequent (a milder class-prior shift);
- rotation: each image rotated by 10-20 degrees either way (scipy.ndimage.rotate, bilinear);
- stroke: a thicker pen (grey dilation over 2x2 neighbourhoods).

Printed: per scenario, the share of seeds flagged (detection rate; for "clean" the false-positive rate),
the mean number of drifted features, and the median largest PSI.

    python benchmarks/drift_digits.py                    # 200 seeds, ~3 min on 2 cores
    python benchmarks/drift_digits.py --seeds 20
"""

from __future__ import annotations

import argparse
import time
import warnings
from collections.abc import Callable

import numpy as np

Shift = Callable[
    [np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.random.Generator], tuple[np.ndarray, np.ndarray]
]


def _brightness(x, y, ref_x, ref_y, rng):  # type: ignore[no-untyped-def]
    return np.clip(x * 1.3 + 1.0, 0, 16), y


def _noise(x, y, ref_x, ref_y, rng):  # type: ignore[no-untyped-def]
    return np.clip(x + rng.normal(0, 2.0, x.shape), 0, 16), y


def _writers(x, y, ref_x, ref_y, rng):  # type: ignore[no-untyped-def]
    from sklearn.cluster import KMeans

    keep = []
    for digit in np.unique(y):
        rows = np.flatnonzero(y == digit)
        if len(rows) < 4:
            continue
        labels = KMeans(n_clusters=2, n_init=4, random_state=0).fit_predict(x[rows])
        centre = ref_x[ref_y == digit].mean(axis=0)
        distance = [np.linalg.norm(x[rows[labels == k]].mean(axis=0) - centre) for k in (0, 1)]
        keep.extend(rows[labels == int(np.argmax(distance))])
    keep = np.array(sorted(keep))
    return x[keep], y[keep]


def _classes(x, y, ref_x, ref_y, rng):  # type: ignore[no-untyped-def]
    keep = y < 5
    return x[keep], y[keep]


def _priors(x, y, ref_x, ref_y, rng):  # type: ignore[no-untyped-def]
    # every class still present, but 0s and 1s are three times as frequent as the others
    weight = np.where(y < 2, 3.0, 1.0)
    keep = rng.choice(len(y), size=len(y), replace=True, p=weight / weight.sum())
    return x[keep], y[keep]


def _rotation(x, y, ref_x, ref_y, rng):  # type: ignore[no-untyped-def]
    from scipy.ndimage import rotate

    angles = rng.uniform(10, 20, len(x)) * rng.choice([-1, 1], len(x))
    images = [
        rotate(img.reshape(8, 8), a, reshape=False, order=1, mode="constant")
        for img, a in zip(x, angles, strict=True)
    ]
    return np.clip(np.array(images).reshape(len(x), 64), 0, 16), y


def _stroke(x, y, ref_x, ref_y, rng):  # type: ignore[no-untyped-def]
    from scipy.ndimage import grey_dilation

    # a thicker pen: each pixel takes the brightest of itself and its right/lower neighbour
    images = [grey_dilation(img.reshape(8, 8), size=(2, 2)) for img in x]
    return np.array(images).reshape(len(x), 64), y


SHIFTS: dict[str, Shift] = {
    "clean": lambda x, y, rx, ry, rng: (x, y),
    "brightness": _brightness,
    "noise": _noise,
    "writers": _writers,
    "classes": _classes,
    "priors": _priors,
    "rotation": _rotation,
    "stroke": _stroke,
}


def split(seed: int) -> tuple[np.ndarray, ...]:
    """(x_train, y_train, x_ref, y_ref, x_held, y_held): a stratified 50/25/25 split of the digits."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x, y = digits.data.astype(np.float32), digits.target
    x_train, x_rest, y_train, y_rest = train_test_split(x, y, test_size=0.5, random_state=seed, stratify=y)
    x_ref, x_held, y_ref, y_held = train_test_split(
        x_rest, y_rest, test_size=0.5, random_state=seed, stratify=y_rest
    )
    return x_train, y_train, x_ref, y_ref, x_held, y_held


def model(x_train: np.ndarray, y_train: np.ndarray):  # type: ignore[no-untyped-def]
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(x_train, y_train)


def run_seed(
    seed: int, scenarios: list[str], alpha: float, min_psi: float
) -> dict[str, tuple[bool, int, float]]:
    from tritonforge.observe.drift import compare, profile

    x_train, y_train, x_ref, y_ref, x_held, y_held = split(seed)
    clf = model(x_train, y_train)
    ref = profile(
        {"input": x_ref},
        {"probabilities": clf.predict_proba(x_ref).astype(np.float32)},
        model="digits",
        seed=seed,
    )
    rng = np.random.default_rng(seed)
    out = {}
    for name in scenarios:
        x, _ = SHIFTS[name](x_held, y_held, x_ref, y_ref, rng)
        x = x.astype(np.float32)
        report = compare(
            ref,
            {"input": x, "probabilities": clf.predict_proba(x).astype(np.float32)},
            alpha=alpha,
            min_psi=min_psi,
        )
        out[name] = (report.drifted, len(report.moved), report.max_psi)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=200)
    parser.add_argument("--alpha", type=float, default=0.01)
    parser.add_argument("--min-psi", type=float, default=0.1)
    parser.add_argument("--scenarios", nargs="*", default=list(SHIFTS))
    args = parser.parse_args()
    started = time.perf_counter()
    results: dict[str, list[tuple[bool, int, float]]] = {s: [] for s in args.scenarios}
    for seed in range(args.seeds):
        for name, row in run_seed(seed, args.scenarios, args.alpha, args.min_psi).items():
            results[name].append(row)
    print(
        f"digits drift: {args.seeds} seeds, alpha {args.alpha} (BH over features), min PSI {args.min_psi}, "
        f"{time.perf_counter() - started:.0f}s"
    )
    print(
        f"{'scenario':<12} {'flagged':>10} {'rate':>7} {'features moved (mean)':>22} {'max PSI (median)':>17}"
    )
    for name, rows in results.items():
        flagged = sum(r[0] for r in rows)
        label = "false pos." if name == "clean" else "detected"
        print(
            f"{name:<12} {flagged:>4}/{len(rows):<5} {flagged / len(rows):>7.1%} "
            f"{np.mean([r[1] for r in rows]):>22.1f} {np.median([r[2] for r in rows]):>17.3f}  ({label})"
        )


if __name__ == "__main__":
    main()
