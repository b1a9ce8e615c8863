"""Drift on real data through a real server: a digits model served by Triton, its reference profile
beside its manifest, traffic kept by the sampler, judged by `tritonforge drift` (exit 0 / 1 like diff)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tritonforge.client import Client, RetryPolicy
from tritonforge.errors import ClientError, ObserveError
from tritonforge.observe.drift import (
    PROFILE_FILE,
    DriftError,
    compare,
    features,
    profile,
    psi,
    read_profile,
    write_profile,
)
from tritonforge.observe.logs import JsonLogHook
from tritonforge.observe.sampler import Sampler, SampleStore
from tritonforge.repository import add_model
from tritonforge.server import EmbeddedServer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import drift_digits

pytest.importorskip("sklearn")


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A logistic regression on a 50/25/25 digits split, exported to ONNX and added with its profile."""
    from tritonforge.export import export_sklearn

    x_train, y_train, x_ref, y_ref, x_held, y_held = drift_digits.split(0)
    clf = drift_digits.model(x_train, y_train)
    root = tmp_path_factory.mktemp("drift")
    artifact = export_sklearn(clf, x_ref, root / "src" / "model.onnx", labels=y_ref, name="digits_logreg")
    assert artifact.passed
    repo = root / "repo"
    version_dir = add_model(repo, "digits_logreg", artifact.path, max_batch_size=64)
    # what the build does after verification (tritonforge.examples.build_digits)
    ref = profile(
        {"input": x_ref},
        {"probabilities": clf.predict_proba(x_ref).astype(np.float32)},
        model="digits_logreg",
        version=version_dir.name,
    )
    write_profile(version_dir, ref)
    return {"repo": repo, "x_held": x_held, "y_held": y_held, "x_ref": x_ref, "y_ref": y_ref, "root": root}


@pytest.fixture(scope="module")
def digits_server(digits: dict) -> Iterator[EmbeddedServer]:
    with EmbeddedServer(digits["repo"]) as server:
        yield server


def _send(server: EmbeddedServer, store: Path, x: np.ndarray) -> Sampler:
    with (
        Sampler(store, share=1.0, seed=0) as sampler,
        Client(server.grpc_url, retry=RetryPolicy.none(), metrics=False, hooks=[sampler]) as client,
    ):
        for start in range(0, len(x), 10):
            client.infer("digits_logreg", {"input": x[start : start + 10].astype(np.float32)})
    return sampler


def _drift(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tritonforge", "drift", *args], capture_output=True, text=True, timeout=300
    )


@pytest.mark.slow
def test_drift_exits_0_for_clean_held_out_traffic_and_1_for_brighter_digits(
    digits: dict, digits_server: EmbeddedServer, tmp_path: Path
) -> None:
    clean, bright = tmp_path / "clean", tmp_path / "bright"
    sampler = _send(digits_server, clean, digits["x_held"])
    assert sampler.stats.rows == len(digits["x_held"]) and sampler.stats.errors == 0
    x_bright, _ = drift_digits.SHIFTS["brightness"](digits["x_held"], digits["y_held"], None, None, None)
    _send(digits_server, bright, x_bright)
    repo = str(digits["repo"])

    done = _drift("--store", str(clean), "--repo", repo, "--model", "digits_logreg")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "no drift" in done.stdout

    html, prom = tmp_path / "report.html", tmp_path / "drift.prom"
    done = _drift(
        "--store",
        str(bright),
        "--repo",
        repo,
        "--model",
        "digits_logreg",
        "--html",
        str(html),
        "--metrics-file",
        str(prom),
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "DRIFTED" in done.stdout and "input[" in done.stdout
    page = html.read_text()
    assert "DRIFTED" in page and page.count("<img src='data:image/png;base64,") == 12
    metrics = prom.read_text()
    assert 'tritonforge_drift_detected{model="digits_logreg",version="1"} 1.0' in metrics
    assert 'tritonforge_drift_psi{feature="probabilities[0]",model="digits_logreg",version="1"}' in metrics

    done = _drift("--store", str(bright), "--repo", repo, "--model", "digits_logreg", "--json")
    report = json.loads(done.stdout)
    assert report["drifted"] is True and report["current_rows"] == len(x_bright)


def test_drift_exits_2_with_one_line_when_there_is_no_profile_or_no_traffic(
    digits: dict, tmp_path: Path
) -> None:
    done = _drift("--store", str(tmp_path), "--repo", str(digits["repo"]), "--model", "nope")
    assert done.returncode == 2 and "no drift_profile.json" in done.stderr
    assert done.stderr.strip().count("\n") == 0
    done = _drift("--store", str(tmp_path), "--repo", str(digits["repo"]), "--model", "digits_logreg")
    assert done.returncode == 2 and "no sampled traffic of 'digits_logreg'" in done.stderr


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(5))
def test_digits_shifts_are_flagged_and_a_clean_held_out_split_is_not(seed: int) -> None:
    judged = drift_digits.run_seed(seed, ["clean", "brightness", "noise", "classes"], alpha=0.01, min_psi=0.1)
    assert judged["clean"][0] is False, judged["clean"]
    assert judged["brightness"][0] and judged["noise"][0] and judged["classes"][0], judged


def test_profile_is_stored_beside_the_manifest_and_read_back_as_the_newest_version(digits: dict) -> None:
    version_dir = digits["repo"] / "digits_logreg" / "1"
    assert (version_dir / "manifest.json").is_file() and (version_dir / PROFILE_FILE).is_file()
    ref = read_profile(digits["repo"], "digits_logreg")
    assert ref.version == "1" and ref.rows == len(digits["x_ref"])
    assert set(ref.features) == {f"input[{i}]" for i in range(64)} | {
        f"probabilities[{i}]" for i in range(10)
    }
    assert ref.features["input[0]"].role == "input" and ref.features["probabilities[3]"].role == "output"


def test_compare_raises_drift_error_when_traffic_is_too_small_or_shares_no_feature(digits: dict) -> None:
    ref = read_profile(digits["repo"], "digits_logreg")
    with pytest.raises(DriftError, match="need 30"):
        compare(ref, {"input": digits["x_held"][:5]})
    with pytest.raises(DriftError, match="shares no feature"):
        compare(ref, {"other": np.zeros((50, 3))})


def test_psi_is_zero_for_the_reference_itself_and_grows_with_a_shift() -> None:
    values = np.random.default_rng(0).normal(size=5000)
    ref = profile({"x": values})
    fp = ref.features["x"]
    assert psi(fp.edges, fp.shares, values) == pytest.approx(0.0, abs=1e-9)
    assert psi(fp.edges, fp.shares, values + 0.5) > 0.1


def test_text_features_are_token_lengths_and_the_share_of_unknown_words() -> None:
    texts = np.array([[b"the cat sat"], [b"a dog ran far away"]], dtype=object)
    ref = profile({"TEXT": texts})
    assert {"TEXT:tokens", "TEXT:chars", "TEXT:oov"} <= set(ref.features)
    now = features({"TEXT": np.array([[b"zebra quantum cat"]], dtype=object)}, vocab=ref.vocab)
    assert now["TEXT:tokens"].tolist() == [3.0]
    assert now["TEXT:oov"][0] == pytest.approx(2 / 3)


# -- the sampler: bounded, rotating, never failing a call ----------------------------------------------


def test_sampler_keeps_about_its_share_of_calls_and_stores_rows_per_batch_row(tmp_path: Path) -> None:
    with Sampler(tmp_path, share=0.25, seed=1) as sampler:
        for i in range(400):
            sampler.record("m", "1", {"x": np.full((2, 3), i, np.float32)}, {"y": np.ones((2, 1))})
    assert 60 <= sampler.stats.kept <= 140
    data = SampleStore(tmp_path).load("m")
    assert data["x"].shape == (2 * sampler.stats.kept, 3) and data["y"].shape == (2 * sampler.stats.kept, 1)


def test_sampler_store_rotates_to_stay_within_max_bytes(tmp_path: Path) -> None:
    with Sampler(tmp_path, share=1.0, rows_per_file=10, max_bytes=40_000) as sampler:
        for _ in range(200):
            sampler.record("m", None, {"x": np.random.default_rng(0).normal(size=(10, 64))}, None)
    store = SampleStore(tmp_path)
    assert sampler.stats.files > len(store.files())  # old files were deleted
    assert sum(f.stat().st_size for f in store.files()) <= 40_000


def test_sampler_never_fails_a_call_when_its_store_cannot_be_written(
    server: EmbeddedServer, tmp_path: Path
) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the store should be")
    with Sampler(blocker, share=1.0, flush_interval_s=0.1) as sampler:
        with Client(server.grpc_url, metrics=False, hooks=[sampler]) as client:
            out = client.infer("mlp", {"x": np.zeros((2, 8), np.float32)})
        sampler.flush()
    assert out["probs"].shape == (2, 3)
    assert sampler.stats.errors >= 1 and sampler.stats.files == 0


def test_sampler_as_a_hook_ignores_events_without_tensors(tmp_path: Path) -> None:
    from tritonforge.client import ClientEvent

    with Sampler(tmp_path, share=1.0) as sampler:
        sampler(ClientEvent("request", "m", None, None))
    assert sampler.stats.seen == 0 and sampler.stats.errors == 0


# -- structured logs -------------------------------------------------------------------------------------


def test_json_log_hook_writes_one_line_per_call_with_its_outcome(server: EmbeddedServer) -> None:
    stream = io.StringIO()
    hook = JsonLogHook(stream)
    with Client(server.grpc_url, hooks=[hook], retry=RetryPolicy.none(), metrics=False) as client:
        client.infer("mlp", {"x": np.zeros((1, 8), np.float32)})
        with pytest.raises(ClientError):
            client.infer("no_such_model", {"x": np.zeros((1, 8), np.float32)})
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [line["model"] for line in lines] == ["mlp", "no_such_model"]
    ok, failed = lines
    assert ok["outcome"] == "ok" and ok["endpoint"] == server.grpc_url and ok["attempts"] == 1
    assert ok["latency_ms"] > 0 and ok["request_id"] and ok["request_id"] != failed["request_id"]
    assert failed["outcome"] == "ModelNotFoundError" and "no_such_model" in failed["error"]
    assert hook.errors == 0


@pytest.mark.slow
def test_build_digits_stores_a_profile_of_its_verification_split_beside_the_manifest(tmp_path: Path) -> None:
    from tritonforge.examples import build_digits

    repo = tmp_path / "repo"
    (step,) = build_digits.build(repo, kinds=("logreg",))
    assert step.status == "OK"
    ref = read_profile(repo, "digits_logreg")
    _, x_test, _, _ = build_digits.digits_split()
    assert ref.rows == len(x_test) and ref.version == "1"
    assert ref.features["input[36]"].mean == pytest.approx(float(x_test[:, 36].mean()), rel=1e-6)
    assert {f"probabilities[{i}]" for i in range(10)} <= set(ref.features)


# -- every feature can move; nothing malformed reads as "no drift" -----------------------------------------


def test_every_single_pixel_drift_is_flagged_and_no_other_pixel_is(digits: dict) -> None:
    ref = read_profile(digits["repo"], "digits_logreg")
    mostly_zero = [i for i in range(64) if (digits["x_ref"][:, i] == 0).mean() >= 0.9]
    assert len(mostly_zero) >= 10  # the pixels a deciles-only binning left with one bin (PSI always 0)
    for i in range(64):
        x = digits["x_held"].copy()
        x[:, i] = np.clip(x[:, i] + 4, 0, 16)
        report = compare(ref, {"input": x})
        assert [f.feature for f in report.moved if f.role == "input"] == [f"input[{i}]"], i
        assert report.verdict == "drifted"


def test_a_point_mass_gets_its_own_bin_so_a_constant_that_changes_moves_psi() -> None:
    ref = profile({"c": np.full((200, 1), 3.0), "z": np.where(np.arange(200) < 190, 0.0, 5.0)[:, None]})
    assert psi(ref.features["c"].edges, ref.features["c"].shares, np.full(50, 4.0)) > 1
    z = ref.features["z"]
    assert len(z.shares) >= 3 and max(z.shares) == pytest.approx(0.95)
    assert psi(z.edges, z.shares, np.full(50, 0.5)) > 1  # a zero pixel that turned faintly grey


def _store_with_files(root: Path, x: np.ndarray, *extra: dict[str, np.ndarray]) -> SampleStore:
    store = SampleStore(root)
    store.write("digits_logreg", None, [{"ts": 1.0, "input": row.tolist()} for row in x])
    for tensors in extra:
        rows = len(next(iter(tensors.values())))
        store.write(
            "digits_logreg",
            None,
            [{"ts": 2.0, **{k: v[i].tolist() for k, v in tensors.items()}} for i in range(rows)],
        )
    return store


def test_sample_files_of_the_wrong_width_or_lacking_a_tensor_make_the_verdict_incomplete(
    digits: dict, tmp_path: Path
) -> None:
    ref = read_profile(digits["repo"], "digits_logreg")
    x = digits["x_held"]
    store = _store_with_files(tmp_path / "s", x, {"input": x[:10, :63]}, {"other": np.zeros((5, 2))})
    samples = store.read("digits_logreg")
    assert len(samples.problems) == 2 and samples.rows == len(x)
    assert "10 row(s) of 'input' are 63 wide, not 64" in samples.problems[0]
    assert "lacks tensor(s) input" in samples.problems[1]
    report = compare(ref, samples.tensors, problems=samples.problems)
    assert report.verdict == "incomplete" and not report.complete and report.as_dict()["drifted"] is False
    with pytest.raises(ObserveError, match="2 sample file"):
        store.load("digits_logreg")  # the strict reader refuses rather than judge fewer rows


def test_drift_exits_3_incomplete_naming_each_bad_file_and_2_for_nan_thresholds(
    digits: dict, tmp_path: Path
) -> None:
    store = _store_with_files(tmp_path / "s", digits["x_held"])
    folder = store.root / "digits_logreg" / "default"
    (folder / "part-00000000000000000009-1.parquet").write_bytes(b"")
    (folder / "part-00000000000000000010-1.parquet").write_bytes(b"PAR1 not parquet")
    store.write("digits_logreg", None, [])  # a file with no rows
    repo = str(digits["repo"])
    done = _drift("--store", str(store.root), "--repo", repo, "--model", "digits_logreg", "--json")
    assert done.returncode == 3, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert report["verdict"] == "incomplete" and len(report["problems"]) == 3
    joined = " ".join(report["problems"])
    assert "empty (0 bytes)" in joined and "not a readable Parquet file" in joined and "no rows" in joined
    for bad in (["--min-psi", "nan"], ["--alpha", "nan"], ["--min-psi", "inf"]):
        done = _drift("--store", str(store.root), "--repo", repo, "--model", "digits_logreg", *bad)
        assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    html = tmp_path / "report-folder"
    html.mkdir()
    done = _drift("--store", str(store.root), "--repo", repo, "--model", "digits_logreg", "--html", str(html))
    assert done.returncode == 2 and "is a folder" in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report-folder", "s"]  # no temp file beside it


@pytest.mark.parametrize(
    "edit",
    [
        lambda f: f["features"][0].update(shares=[float("nan")] * len(f["features"][0]["shares"])),
        lambda f: f["features"][0].update(
            shares=[-1.0]
            + [2.0 / (len(f["features"][0]["shares"]) - 1)] * (len(f["features"][0]["shares"]) - 1)
        ),
        lambda f: f["features"][0].update(edges=list(reversed(f["features"][0]["edges"]))),
        lambda f: f["features"][0].update(sample=[]),
        lambda f: f["features"][0].update(mean=float("inf")),
        lambda f: f["features"][0].update(extra=1),
        lambda f: f.update(rows=-1),
        lambda f: f.update(surprise=True),
        lambda f: f.pop("features"),
    ],
    ids=[
        "nan-shares",
        "negative-share",
        "unsorted-edges",
        "empty-sample",
        "inf-mean",
        "unknown-feature-key",
        "negative-rows",
        "unknown-key",
        "no-features",
    ],
)
def test_read_profile_refuses_a_malformed_profile_naming_the_field(
    digits: dict, tmp_path: Path, edit
) -> None:  # type: ignore[no-untyped-def]
    data = json.loads((digits["repo"] / "digits_logreg" / "1" / PROFILE_FILE).read_text())
    edit(data)
    path = tmp_path / PROFILE_FILE
    path.write_text(json.dumps(data))
    with pytest.raises(DriftError, match="not a valid drift profile"):
        read_profile(path)


def test_profiles_are_readable_like_manifests_and_versions_of_traffic_never_mix(
    digits: dict, tmp_path: Path
) -> None:
    version_dir = digits["repo"] / "digits_logreg" / "1"
    assert (version_dir / PROFILE_FILE).stat().st_mode & 0o777 == 0o644
    store = _store_with_files(tmp_path / "s", digits["x_held"][:40])
    with pytest.raises(ObserveError, match=r"version 1 .*sampled versions: default; 'default' holds calls"):
        store.read("digits_logreg", "1")
    store.write("digits_logreg", "1", [{"ts": 3.0, "input": [0.0] * 64}])
    with pytest.raises(ObserveError, match=r"sampled for versions 1, default in .*: pick one"):
        store.read("digits_logreg")
    assert store.read("digits_logreg", "default").rows == 40
    assert store.read("digits_logreg", "default", since_s=1.5).rows == 0


def test_the_missing_profile_hint_names_the_build_that_writes_one_or_says_none_does(digits: dict) -> None:
    with pytest.raises(DriftError, match=r"this model.s build writes none; call tritonforge\.observe\.drift"):
        read_profile(digits["repo"], "nope")


def test_drift_exits_3_when_no_sample_file_is_usable(digits: dict, tmp_path: Path) -> None:
    folder = tmp_path / "s" / "digits_logreg" / "default"
    folder.mkdir(parents=True)
    (folder / "part-00000000000000000001-1.parquet").write_bytes(b"")
    done = _drift("--store", str(tmp_path / "s"), "--repo", str(digits["repo"]), "--model", "digits_logreg")
    assert done.returncode == 3 and "incomplete: none of the 1 sample file(s)" in done.stderr
    assert done.stderr.count("\n") == 1
