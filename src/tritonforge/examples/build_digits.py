"""Build the digits classifiers into the model repository: logistic regression, MLP and random forest.

Each is trained on scikit-learn's bundled digits (8x8 images, 10 classes; a stratified 75/25 split),
exported to ONNX with tensor outputs (``label`` INT64, ``probabilities`` FP32; float32 ``input`` [N, 64]
of raw pixel values 0-16), checked against scikit-learn on the test split, and registered as
``digits_<kind>`` with its test accuracy and its serving layout (instances x intra-op threads, chosen by
measuring each candidate on this machine; the manifest says why). An unchanged model (same data, settings,
libraries, CPU count) is skipped and keeps the layout measured when it was built.

    python -m tritonforge.examples.build_digits [--repo model_repository] [--force]
"""

from __future__ import annotations

import hashlib
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from tritonforge.examples._common import run
from tritonforge.observe.drift import profile as drift_profile
from tritonforge.observe.drift import write_profile
from tritonforge.registry import Step, build_key, find_built, register
from tritonforge.repository import infer_config
from tritonforge.repository.layout import choose_layout, layout_key

SEED = 0
MAX_BATCH_SIZE = 64
#: a digits request computes in ~0.1 ms: short rounds measure thousands of calls per layout, so the whole
#: choice costs about a second per model
LAYOUT_ROUNDS = 3
LAYOUT_ROUND_S = 0.15


def digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, x_test, y_train, y_test): float32 pixels 0-16, the split every test and tool uses."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = digits.data.astype(np.float32)
    return train_test_split(x, digits.target, test_size=0.25, random_state=SEED, stratify=digits.target)


def estimators() -> dict[str, Any]:
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return {
        "logreg": make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=1.0)),
        "mlp": make_pipeline(
            StandardScaler(), MLPClassifier(hidden_layer_sizes=(64,), max_iter=400, random_state=SEED)
        ),
        "random_forest": RandomForestClassifier(n_estimators=100, max_depth=12, random_state=SEED, n_jobs=1),
    }


#: the members' batcher delay (see the config below)
MEMBER_QUEUE_DELAY_US = 0


def _data_sha(*arrays: np.ndarray) -> str:
    digest = hashlib.sha256()
    for a in arrays:
        digest.update(np.ascontiguousarray(a).tobytes())
    return digest.hexdigest()


def build(
    repo: Path, *, force: bool = False, console: Any = None, kinds: tuple[str, ...] | None = None
) -> list[Step]:
    from sklearn.exceptions import ConvergenceWarning

    from tritonforge.export import export_sklearn

    x_train, x_test, y_train, y_test = digits_split()
    data_sha = _data_sha(x_train, x_test, y_train, y_test)
    steps: list[Step] = []
    for kind, estimator in estimators().items():
        if kinds and kind not in kinds:
            continue
        name = f"digits_{kind}"
        settings = {
            "estimator": repr(estimator),
            "zipmap": False,
            "input_dtype": "float32",
            "max_batch_size": MAX_BATCH_SIZE,
            "max_queue_delay_us": MEMBER_QUEUE_DELAY_US,
            # the layout is measured for this machine's CPUs and rule: another builds (and measures) anew
            **layout_key(),
        }
        key = build_key("onnx", data_sha, settings)
        existing = None if force else find_built(repo, name, key)
        if existing is not None:
            steps.append(Step(name, "onnx", "SKIPPED", existing, detail="unchanged"))
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            estimator.fit(x_train, y_train)
        accuracy = float(np.mean(estimator.predict(x_test) == y_test))
        with tempfile.TemporaryDirectory(prefix="tritonforge-digits-") as work:
            artifact = export_sklearn(estimator, x_test, Path(work) / "model.onnx", labels=y_test, name=name)
            if not artifact.passed:
                steps.append(Step(name, "onnx", "FAILED", detail="; ".join(artifact.failures())))
                continue
            # one request's worth (a single image): how the members are called inside digits_vote
            layout = choose_layout(
                artifact.path, {"input": x_test[:1]}, rounds=LAYOUT_ROUNDS, duration_s=LAYOUT_ROUND_S
            )
            config = infer_config(
                name,
                artifact.path,
                max_batch_size=MAX_BATCH_SIZE,
                # no delay: a request answers in ~0.1 ms of compute, so a wait would only hold a lone one
                # back (it halved digits_vote's throughput at concurrency 1: the three members each
                # waited); under load requests queue behind the running batch and group by themselves
                max_queue_delay_us=MEMBER_QUEUE_DELAY_US,
            )
            version = register(
                repo,
                name,
                artifact,
                source={
                    "path": "sklearn.datasets.load_digits (bundled with scikit-learn)",
                    "sha256": data_sha,
                    "estimator": repr(estimator),
                    "split": {
                        "test_size": 0.25,
                        "random_state": SEED,
                        "stratify": True,
                        "train_rows": len(x_train),
                        "test_rows": len(x_test),
                    },
                },
                config=layout.apply(config),
                extra={
                    "metrics": {"test_accuracy": accuracy, "test_rows": len(x_test)},
                    "build": {"key": key, "script": "tritonforge.examples.build_digits"},
                    "variant": "onnx",
                    "layout": layout.as_manifest(),
                },
            )
        # drift reference: the verification split and the model's outputs on it, beside the manifest
        probabilities = estimator.predict_proba(x_test).astype(np.float32)
        reference = drift_profile(
            {"input": x_test}, {"probabilities": probabilities}, model=name, version=version.name
        )
        write_profile(version, reference)
        label = artifact.reports["label"]
        steps.append(
            Step(
                name,
                "onnx",
                "OK",
                int(version.name),
                figures=f"test acc {accuracy:.4f}, ONNX labels = sklearn on "
                f"{label.label_agreement:.0%} of {label.samples}, layout {layout.chosen.label}",
            )
        )
    return steps


def main(argv: list[str] | None = None) -> int:
    """The command line (``python -m tritonforge.examples.build_digits``); returns the exit code."""
    return run(build, (__doc__ or "").splitlines()[0], argv)


if __name__ == "__main__":
    sys.exit(main())
