"""Hostile files, names and numbers: every tool answers with one clear line of ours (or succeeds), at once.

The first part holds the reproducers of a round of hostile input, each a regression test: a model file
that is a symlink to /dev/zero or a FIFO (an OOM kill and a hang before), names and numbers Triton refuses,
version policies that serve nothing, duplicate YAML keys, a corrupt audit log. The second part is
property-based (hypothesis, bounded by ``hostile_strategies.BOUNDED``): whatever is drawn, the answer is
a result or one of our errors, never a raw exception and never a hang. No server here: what Triton itself
does with these inputs was checked against the real 2.51 binary, as the messages say.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

import tiny_models
from cli_runner import run_tritonforge
from hostile_strategies import BOUNDED, edge_numbers, hostile_names, json_lines, yaml_documents
from tritonforge.config import ModelConfig, VersionPolicy, read_config
from tritonforge.config.validate import model_name_problem
from tritonforge.ensemble import load_spec
from tritonforge.errors import ConfigError, RepositoryError, SLOError, TritonForgeError
from tritonforge.files import (
    MAX_LINE_BYTES,
    Reason,
    check_regular,
    copy_tree,
    iter_lines,
    load_yaml,
    read_bytes,
    read_text,
    read_yaml,
)
from tritonforge.observe.slo import load_slo, rules
from tritonforge.registry import read_audit_log, record_event
from tritonforge.repository import add_model, check_repository

ONE_SECOND = 1.0


@pytest.fixture()
def mlp(tmp_path: Path) -> Path:
    return tiny_models.mlp_onnx(tmp_path / "src" / "mlp.onnx")


@pytest.fixture()
def zero(tmp_path: Path) -> Path:
    link = tmp_path / "z.onnx"
    link.symlink_to("/dev/zero")
    return link


@pytest.fixture()
def fifo(tmp_path: Path) -> Path:
    path = tmp_path / "f.onnx"
    os.mkfifo(path)
    return path


def timed(call: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    try:
        result: Any = call()
    except Exception as exc:
        result = exc
    return time.perf_counter() - start, result


# ------------------------------------------------------------------ the helpers every reader goes through


def test_read_helpers_refuse_a_device_a_fifo_and_a_folder_naming_each(tmp_path, zero, fifo) -> None:
    for path, kind in ((zero, "a character device"), (fifo, "a FIFO (named pipe)"), (tmp_path, "a folder")):
        seconds, exc = timed(lambda p=path: read_bytes(p, what="thing", error=ConfigError))
        assert isinstance(exc, ConfigError) and seconds < ONE_SECOND
        assert f"is {kind}, not a regular file; give the thing itself" in exc.message
    assert "(a symlink to /dev/zero)" in str(timed(lambda: check_regular(zero))[1])


def test_read_helpers_refuse_a_file_over_the_limit_and_name_both_sizes(tmp_path) -> None:
    big = tmp_path / "big.yaml"
    with big.open("wb") as out:
        out.truncate(64 << 20)  # sparse: no disk used
    with pytest.raises(SLOError, match=r"is 64 MiB, more than the 1 MiB a SLO file may be"):
        read_text(big, what="SLO file", limit=1 << 20, error=SLOError)


def test_reason_keeps_problem_and_fix_apart_and_reads_as_one_line() -> None:
    reason = Reason("x is wrong", "do y")
    assert str(reason) == "x is wrong; do y" and (reason.problem, reason.fix) == ("x is wrong", "do y")


def test_read_text_names_the_first_byte_that_is_not_utf8(tmp_path) -> None:
    bad = tmp_path / "c.pbtxt"
    bad.write_bytes(b'name: "m"\xff')
    with pytest.raises(ConfigError, match=r"is not UTF-8 text \(byte 9 is 0xff\)"):
        read_text(bad, what="config", error=ConfigError)


def test_iter_lines_skips_an_overlong_line_without_holding_it(tmp_path) -> None:
    log = tmp_path / "log"
    log.write_bytes(b"first\n" + b"x" * (MAX_LINE_BYTES * 3) + b"\nthird\n")
    assert list(iter_lines(log)) == [(1, b"first"), (2, None), (3, b"third")]


def test_copy_tree_refuses_a_fifo_inside_a_folder_before_writing_anything(tmp_path) -> None:
    folder = tmp_path / "savedmodel"
    (folder / "variables").mkdir(parents=True)
    (folder / "saved_model.pb").write_bytes(b"pb")
    os.mkfifo(folder / "variables" / "pipe")
    with pytest.raises(RepositoryError, match="pipe is a FIFO"):
        copy_tree(folder, tmp_path / "out", error=RepositoryError)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ add-model and validate: model files


@pytest.mark.parametrize("kind", ["zero", "fifo"])
def test_add_model_refuses_a_device_or_fifo_in_under_a_second(tmp_path, kind, request) -> None:
    path = request.getfixturevalue(kind)
    seconds, exc = timed(lambda: add_model(tmp_path / "repo", "m", path))
    assert isinstance(exc, RepositoryError) and "not a regular file" in exc.message, exc
    assert seconds < ONE_SECOND, f"{seconds:.2f} s"
    assert not (tmp_path / "repo" / "m").exists()


@pytest.mark.parametrize("kind", ["zero", "fifo"])
def test_add_model_with_a_config_given_still_never_reads_a_device_or_fifo(
    tmp_path, kind, request, mlp
) -> None:
    config = add_model(tmp_path / "ok", "m", mlp).parent / "config.pbtxt"
    path = request.getfixturevalue(kind)
    seconds, exc = timed(lambda: add_model(tmp_path / "repo", "m", path, read_config(config)))
    assert isinstance(exc, RepositoryError) and seconds < ONE_SECOND, exc


@pytest.mark.parametrize("kind", ["zero", "fifo"])
def test_validate_reports_a_device_or_fifo_as_the_model_file_in_under_a_second(tmp_path, kind, request, mlp):
    repo = tmp_path / "repo"
    version = add_model(repo, "m", mlp)
    (version / "model.onnx").unlink()
    if kind == "zero":
        (version / "model.onnx").symlink_to("/dev/zero")
    else:
        os.mkfifo(version / "model.onnx")
    seconds, problems = timed(lambda: check_repository(repo))
    assert seconds < ONE_SECOND, f"{seconds:.2f} s"
    assert [p.severity for p in problems] == ["error"] and "not a regular file" in problems[0].message


def test_the_cli_fails_on_one_line_for_a_fifo_and_a_device_and_never_hangs(tmp_path, zero, fifo, mlp) -> None:
    for path in (zero, fifo):
        done = run_tritonforge("add-model", str(tmp_path / "repo"), "m", str(path), timeout=60)
        assert done.returncode == 1 and done.stderr.count("\n") == 1 and "not a regular file" in done.stderr
    repo = tmp_path / "checked"
    version = add_model(repo, "m", mlp)
    (version / "model.onnx").unlink()
    os.mkfifo(version / "model.onnx")
    done = run_tritonforge("validate", str(repo), timeout=60)
    assert done.returncode == 1 and "is a FIFO (named pipe), not a regular file" in done.stdout


def test_an_empty_model_file_is_refused_by_add_model_and_by_validate(tmp_path, mlp) -> None:
    empty = tmp_path / "empty.onnx"
    empty.touch()
    with pytest.raises(RepositoryError, match=r"is empty \(0 bytes\)"):
        add_model(tmp_path / "repo", "e", empty)
    repo = tmp_path / "checked"
    version = add_model(repo, "m", mlp)
    (version / "model.onnx").write_bytes(b"")
    assert any("empty (0 bytes)" in p.message for p in check_repository(repo))


def test_a_protobuf_that_is_no_onnx_model_is_refused(tmp_path) -> None:
    odd = tmp_path / "odd.onnx"
    odd.write_bytes(b"\x08\x01")  # a valid ModelProto: ir_version 1, no graph
    with pytest.raises(TritonForgeError, match="not an ONNX model"):
        add_model(tmp_path / "repo", "m", odd)


# ------------------------------------------------------------------ names and numbers Triton refuses


@pytest.mark.parametrize(
    "name", ["a\nb", "a\tb", "\u202eab", "a*b", "a\x00b", "a b", "a;b", "modèle", "-a", ".a"]
)
def test_add_model_refuses_names_outside_the_rule_and_states_it(tmp_path, mlp, name) -> None:
    with pytest.raises(RepositoryError) as caught:
        add_model(tmp_path / "repo", name, mlp)
    message = caught.value.message
    assert "ASCII letters, digits, '_', '-' or '.'" in message and "\n" not in message
    assert repr(name) in message  # control characters shown escaped, never raw
    assert not (tmp_path / "repo").exists() or not any((tmp_path / "repo").iterdir())


def test_names_inside_the_rule_are_accepted(tmp_path, mlp) -> None:
    for name in ("resnet50", "bert-base.v2", "_private", "9lives", "x" * 255):
        assert model_name_problem(name) is None
    assert model_name_problem("x" * 256) is not None
    add_model(tmp_path / "repo", "bert-base.v2", mlp)


def test_the_cli_refuses_an_out_of_range_version_and_batch_size_on_one_line(tmp_path, mlp) -> None:
    for flag, value in (("--version", str(2**64)), ("--version", "0"), ("--max-batch-size", str(2**31))):
        done = run_tritonforge("add-model", str(tmp_path / "repo"), "m", str(mlp), flag, value, timeout=60)
        assert done.returncode != 0 and done.stderr.count("\n") == 1, done.stderr
        assert "Traceback" not in done.stderr and "unexpected" not in done.stderr
    assert not (tmp_path / "repo" / "m").exists()


def test_add_model_refuses_a_version_beyond_int64_in_the_library(tmp_path, mlp) -> None:
    with pytest.raises(ValueError, match="version must be 1 to 9223372036854775807"):
        add_model(tmp_path / "repo", "m", mlp, version=2**63)


def test_validate_reports_version_folders_triton_does_not_read(tmp_path, mlp) -> None:
    repo = tmp_path / "repo"
    version = add_model(repo, "m", mlp)
    (repo / "m" / str(2**63)).mkdir()  # loading it kills Triton 2.51
    (repo / "m" / "01").mkdir()  # Triton 2.51 does not read it as version 1
    problems = sorted((p.severity, p.message.split(":")[0]) for p in check_repository(repo))
    assert problems == [
        ("error", f"version folder {2**63} is beyond {2**63 - 1} (int64)"),
        ("warning", "folder 01 is not a version to Triton (a leading zero)"),
    ]
    assert version.name == "1"


@pytest.mark.parametrize(
    ("policy", "match"),
    [
        ("version_policy { specific { versions: [99] } }", "serves none of its versions"),
        ("version_policy { latest { num_versions: 0 } }", "serves no version"),
        ("version_policy { latest { } }", "serves no version"),
    ],
)
def test_validate_refuses_a_version_policy_that_serves_nothing(tmp_path, mlp, policy, match) -> None:
    repo = tmp_path / "repo"
    add_model(repo, "m", mlp)
    config = repo / "m" / "config.pbtxt"
    config.write_text(config.read_text() + policy + "\n")
    problems = [p for p in check_repository(repo) if p.severity == "error"]
    assert len(problems) == 1 and match in problems[0].message


def test_add_model_refuses_a_config_whose_version_policy_serves_none_of_its_versions(tmp_path, mlp) -> None:
    config = read_config(add_model(tmp_path / "ok", "m", mlp).parent)
    with pytest.raises(ConfigError, match=r"specific \{ versions: \[99\] \}"):
        add_model(tmp_path / "repo", "m", mlp, config.replace(version_policy=VersionPolicy.specific(99)))


def test_a_duplicate_tensor_name_is_an_error_in_validate(tmp_path, mlp) -> None:
    repo = tmp_path / "repo"
    add_model(repo, "m", mlp)
    config = repo / "m" / "config.pbtxt"
    config.write_text(config.read_text() + 'input { name: "x" data_type: TYPE_FP32 dims: [8] }\n')
    problems = check_repository(repo)
    assert [p.severity for p in problems] == ["error"] and "appears twice" in problems[0].message


def test_validate_shows_a_hostile_folder_name_escaped_on_one_line(tmp_path, mlp) -> None:
    repo = tmp_path / "repo"
    add_model(repo, "m", mlp)
    (repo / "m").rename(repo / "m\x1b[31mred")
    done = run_tritonforge("validate", str(repo), timeout=60)
    assert done.returncode == 1 and "\x1b" not in done.stdout and "\\x1b[31mred" in done.stdout


# ------------------------------------------------------------------ duplicate YAML keys


@pytest.mark.parametrize(
    "text",
    [
        "name: p\ninputs: [{name: x, dtype: FP32}]\noutputs: [y]\nsteps: []\nsteps: [{model: c}]\n",
        "name: p\nsteps:\n  - name: a\n    model: clf\n    model: other\n",
        "name: p\nname: q\n",
    ],
)
def test_a_spec_with_a_key_written_twice_is_an_issue_naming_both_lines(tmp_path, text) -> None:
    spec_file = tmp_path / "p.yaml"
    spec_file.write_text(text)
    spec, issues = load_spec(spec_file)
    assert spec is None and "appears twice in one mapping (lines" in issues[0].message
    done = run_tritonforge("ensemble", "check", str(spec_file), timeout=120)
    assert done.returncode != 0 and "appears twice" in done.stdout + done.stderr


def test_yaml_merge_keys_and_the_same_key_in_two_mappings_are_fine() -> None:
    text = "base: &b {a: 1}\none: {<<: *b, c: 2}\ntwo: {a: 3}\n"
    assert load_yaml(text) == {"base": {"a": 1}, "one": {"a": 1, "c": 2}, "two": {"a": 3}}


def test_read_yaml_names_the_file_and_every_document_is_checked(tmp_path) -> None:
    file = tmp_path / "m.yaml"
    file.write_text("kind: A\n---\nkind: B\nkind: C\n")
    with pytest.raises(
        TritonForgeError, match=r"manifest .*m.yaml: key 'kind' appears twice .*lines 3 and 4"
    ):
        read_yaml(file, what="manifest", every=True)


# ------------------------------------------------------------------ the audit log


def test_the_audit_log_reports_corrupt_lines_and_keeps_the_rest(tmp_path) -> None:
    record_event(tmp_path, "promote", model="m", reason="first")
    with (tmp_path / "audit.jsonl").open("ab") as log:
        log.write(b'[1, 2]\n{"at": 5, "action": "x"}\n' + b"[" * 5000 + b"]" * 5000 + b"\n")
        log.write(b'{"action": "note", "reason": "caf\xff"}\nnot json\n')
    record_event(tmp_path, "rollback", model="m")
    log = read_audit_log(tmp_path)
    assert [e["action"] for e in log.events] == ["promote", "note", "rollback"]
    assert [n for n, _ in log.skipped] == [2, 3, 4, 6] and log.replaced == [5]
    assert log.events[1]["reason"] == "caf\ufffd"
    summary = log.summary("audit.jsonl")
    assert summary is not None and "4 corrupt line(s) skipped (line 2: an array, not a JSON object" in summary


def test_the_audit_verb_renders_no_markup_and_no_escape_and_validates_last(tmp_path) -> None:
    record_event(
        tmp_path, "promote", model="m", by="eve\x1b[31m", reason="[bold]x[/] [link=http://e]y[/link]"
    )
    with (tmp_path / "audit.jsonl").open("a") as log:
        log.write("[1]\n")
    done = run_tritonforge("audit", str(tmp_path), timeout=60)
    assert done.returncode == 0 and "\x1b" not in done.stdout
    assert "eve\\x1b[31m" in done.stdout and "[bold]x[/] [link=http://e]y[/link]" in done.stdout
    assert "1 corrupt line(s) skipped (line 2" in done.stderr
    for last in ("0", "-1"):
        done = run_tritonforge("audit", str(tmp_path), "--last", last, timeout=60)
        assert done.returncode == 2 and "--last" in done.stderr and done.stderr.count("\n") == 1
    done = run_tritonforge("audit", str(tmp_path), "--last", "1", "--json", timeout=60)
    assert [e["action"] for e in json.loads(done.stdout)] == ["promote"]


def test_a_fifo_as_the_audit_log_is_refused_when_read_and_when_written(tmp_path) -> None:
    os.mkfifo(tmp_path / "audit.jsonl")
    seconds, exc = timed(lambda: read_audit_log(tmp_path))
    assert isinstance(exc, RepositoryError) and "is a FIFO" in exc.message and seconds < ONE_SECOND
    seconds, exc = timed(lambda: record_event(tmp_path, "promote"))
    assert isinstance(exc, RepositoryError) and "not a regular file" in exc.message and seconds < ONE_SECOND


# ------------------------------------------------------------------ property-based


def _ours_or_fine(call: Callable[[], Any], *ours: type[BaseException]) -> None:
    """The call succeeds or raises one of ``ours`` with a one-line message; anything else fails the test."""
    try:
        call()
    except ours as exc:
        message = getattr(exc, "message", str(exc))
        assert message and "\n" not in message and len(message) < 2_000, message


@BOUNDED
@given(text=yaml_documents())
def test_any_yaml_text_is_a_value_or_one_line_of_ours(text: str) -> None:
    _ours_or_fine(lambda: load_yaml(text, max_nodes=100_000), TritonForgeError)


@BOUNDED
@given(name=hostile_names())
def test_any_model_name_is_accepted_exactly_when_it_follows_the_rule(tmp_path_factory, name: str) -> None:
    problem = model_name_problem(name)
    assert problem is None or ("\n" not in problem and "ASCII letters" in problem)
    if problem is None:
        assert name.isascii() and name.isprintable() and " " not in name and "/" not in name


@BOUNDED
@given(name=hostile_names(), version=edge_numbers(), batch=edge_numbers())
def test_add_model_of_any_name_version_and_batch_size_succeeds_or_says_why(
    tmp_path_factory, name: str, version: Any, batch: Any
) -> None:
    work = tmp_path_factory.mktemp("hostile-add")
    model = tiny_models.mlp_onnx(work / "mlp.onnx")
    repo = work / "repo"
    _ours_or_fine(
        lambda: add_model(repo, name, model, version=version, max_batch_size=batch),
        TritonForgeError,
        ValueError,
        TypeError,
    )
    # whatever happened, the repository is either untouched or valid, never half-written
    assert not repo.exists() or [p for p in check_repository(repo) if p.severity == "error"] == []


@BOUNDED
@given(lines=st.lists(json_lines(), max_size=8))
def test_any_audit_log_reads_as_events_and_numbered_skipped_lines(
    tmp_path_factory, lines: list[bytes]
) -> None:
    repo = tmp_path_factory.mktemp("hostile-audit")
    (repo / "audit.jsonl").write_bytes(b"\n".join(line.replace(b"\n", b" ") for line in lines))
    log = read_audit_log(repo)
    assert len(log.events) + len(log.skipped) <= len(lines)
    assert all(isinstance(e, dict) and isinstance(e["action"], str) for e in log.events)
    summary = log.summary("audit.jsonl")
    assert summary is None or "\n" not in summary


@BOUNDED
@given(
    name=hostile_names(),
    objective=st.sampled_from(
        ["p99_latency_ms", "mean_latency_ms", "error_rate", "queue_ms", "max_drift_psi"]
    ),
    value=edge_numbers(),
)
def test_any_slo_file_gives_rules_or_one_slo_error(
    tmp_path_factory, name: str, objective: str, value: Any
) -> None:
    path = tmp_path_factory.mktemp("hostile-slo") / "slo.yaml"
    path.write_text(json.dumps({"models": {name: {objective: value}}}, default=str))

    def build() -> None:
        alerts = rules(load_slo(path))["groups"][1]["rules"]
        for alert in alerts:  # a threshold that is a real number, a name that is a plain word
            assert float(alert["expr"].rsplit(" > ", 1)[1]) > 0
            # the firing series names the model: the rule selects exactly this plain-word name
            assert model_name_problem(name) is None and f'{{model="{name}"}}' in alert["expr"]

    _ours_or_fine(build, SLOError)


@BOUNDED
@given(text=st.text(max_size=300))
def test_any_config_text_is_a_config_or_one_config_error(tmp_path_factory, text: str) -> None:
    folder = tmp_path_factory.mktemp("hostile-config")
    (folder / "config.pbtxt").write_text(text)
    _ours_or_fine(lambda: read_config(folder), ConfigError)


@BOUNDED
@given(data=st.binary(max_size=300))
def test_any_bytes_as_an_onnx_model_are_a_model_or_one_line_of_ours(tmp_path_factory, data: bytes) -> None:
    work = tmp_path_factory.mktemp("hostile-onnx")
    (work / "m.onnx").write_bytes(data)
    _ours_or_fine(lambda: add_model(work / "repo", "m", work / "m.onnx"), TritonForgeError)


def test_a_config_of_a_model_named_outside_the_rule_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="not a usable model name"):
        ModelConfig.from_pbtxt('name: "a b" backend: "python"')
