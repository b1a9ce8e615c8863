"""`tritonforge validate` on a repository written the way NVIDIA's python_backend examples are: decoupled,
stateful (sequence batching), auto-completed (no config.pbtxt) and ensemble models, all served for real."""

from __future__ import annotations

import functools
import re
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from cli_runner import run_tritonforge
from tritonforge.repository import check_repository
from tritonforge.server import EmbeddedServer
from tritonforge.server.live import check_live

ADD_SUB = """
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            a = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            b = pb_utils.get_input_tensor_by_name(request, "INPUT1").as_numpy()
            responses.append(pb_utils.InferenceResponse([
                pb_utils.Tensor("OUTPUT0", (a + b).astype(np.float32)),
                pb_utils.Tensor("OUTPUT1", (a - b).astype(np.float32)),
            ]))
        return responses
"""

COUNTDOWN = '''
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    """Decoupled: answers IN responses (0, 1, ..., IN-1), then the final flag."""

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            count = int(pb_utils.get_input_tensor_by_name(request, "IN").as_numpy().reshape(-1)[0])
            for i in range(count):
                sender.send(pb_utils.InferenceResponse([pb_utils.Tensor("OUT", np.array([i], np.int32))]))
            sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return None
'''

RUNNING_SUM = '''
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    """Stateful: the running total of VALUE over one sequence (START resets it, CORRID names it)."""

    def initialize(self, args):
        self.totals = {}

    def execute(self, requests):
        responses = []
        for request in requests:
            value = pb_utils.get_input_tensor_by_name(request, "VALUE").as_numpy()
            start = pb_utils.get_input_tensor_by_name(request, "START").as_numpy().reshape(-1)[0]
            corrid = int(pb_utils.get_input_tensor_by_name(request, "CORRID").as_numpy().reshape(-1)[0])
            total = (0 if start else self.totals.get(corrid, 0)) + int(value.sum())
            self.totals[corrid] = total
            out = np.full(value.shape, total, dtype=np.int32)
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("TOTAL", out)]))
        return responses
'''

AUTO_DOUBLER = '''
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    """No config.pbtxt: Triton picks the python backend from this file, and this fills in the rest."""

    @staticmethod
    def auto_complete_config(auto_complete_model_config):
        auto_complete_model_config.add_input({"name": "X", "data_type": "TYPE_FP32", "dims": [4]})
        auto_complete_model_config.add_output({"name": "Y", "data_type": "TYPE_FP32", "dims": [4]})
        auto_complete_model_config.set_max_batch_size(8)
        return auto_complete_model_config

    def execute(self, requests):
        return [
            pb_utils.InferenceResponse(
                [pb_utils.Tensor("Y", pb_utils.get_input_tensor_by_name(r, "X").as_numpy() * 2)]
            )
            for r in requests
        ]
'''

CONFIGS = {
    "add_sub": """name: "add_sub"
backend: "python"
input [{ name: "INPUT0" data_type: TYPE_FP32 dims: [ 4 ] }]
input [{ name: "INPUT1" data_type: TYPE_FP32 dims: [ 4 ] }]
output [{ name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 4 ] }]
output [{ name: "OUTPUT1" data_type: TYPE_FP32 dims: [ 4 ] }]
instance_group [{ kind: KIND_CPU }]
""",
    "countdown": """name: "countdown"
backend: "python"
max_batch_size: 0
model_transaction_policy {
  decoupled: True
}
input [{ name: "IN" data_type: TYPE_INT32 dims: [ 1 ] }]
output [{ name: "OUT" data_type: TYPE_INT32 dims: [ 1 ] }]
instance_group [{ kind: KIND_CPU }]
""",
    "running_sum": """name: "running_sum"
backend: "python"
max_batch_size: 4
sequence_batching {
  max_sequence_idle_microseconds: 5000000
  oldest { max_candidate_sequences: 4 preferred_batch_size: [ 2, 4 ] }
  control_input [
    { name: "START" control [{ kind: CONTROL_SEQUENCE_START int32_false_true: [ 0, 1 ] }] },
    { name: "CORRID" control [{ kind: CONTROL_SEQUENCE_CORRID data_type: TYPE_UINT64 }] }
  ]
}
input [{ name: "VALUE" data_type: TYPE_INT32 dims: [ 1 ] }]
output [{ name: "TOTAL" data_type: TYPE_INT32 dims: [ 1 ] }]
instance_group [{ kind: KIND_CPU }]
""",
    "sum_and_difference": """name: "sum_and_difference"
platform: "ensemble"
input [{ name: "A" data_type: TYPE_FP32 dims: [ 4 ] }, { name: "B" data_type: TYPE_FP32 dims: [ 4 ] }]
output [{ name: "SUM" data_type: TYPE_FP32 dims: [ 4 ] }, { name: "DIFF" data_type: TYPE_FP32 dims: [ 4 ] }]
ensemble_scheduling {
  step [{
    model_name: "add_sub"
    model_version: -1
    input_map { key: "INPUT0" value: "A" }
    input_map { key: "INPUT1" value: "B" }
    output_map { key: "OUTPUT0" value: "SUM" }
    output_map { key: "OUTPUT1" value: "DIFF" }
  }]
}
""",
    # Triton serves a dynamic batcher on a model that does not batch (it only queues): a warning.
    "queued_add_sub": """name: "queued_add_sub"
backend: "python"
max_batch_size: 0
dynamic_batching { }
input [{ name: "INPUT0" data_type: TYPE_FP32 dims: [ 4 ] }]
input [{ name: "INPUT1" data_type: TYPE_FP32 dims: [ 4 ] }]
output [{ name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 4 ] }]
output [{ name: "OUTPUT1" data_type: TYPE_FP32 dims: [ 4 ] }]
""",
}
MODEL_FILES = {
    "add_sub": ADD_SUB,
    "queued_add_sub": ADD_SUB,
    "countdown": COUNTDOWN,
    "running_sum": RUNNING_SUM,
    "auto_doubler": AUTO_DOUBLER,
}


def python_backend_style_repository(root: Path) -> Path:
    for name, text in CONFIGS.items():
        (root / name / "1").mkdir(parents=True)
        (root / name / "config.pbtxt").write_text(text)
    for name, code in MODEL_FILES.items():
        (root / name / "1").mkdir(parents=True, exist_ok=True)
        (root / name / "1" / "model.py").write_text(code)
    return root


@pytest.fixture(scope="module")
def interop_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return python_backend_style_repository(tmp_path_factory.mktemp("interop") / "repo")


run_cli = functools.partial(run_tritonforge, timeout=600)


def test_check_repository_accepts_decoupled_sequence_auto_complete_and_ensemble_models(interop_repo):
    problems = check_repository(interop_repo)
    assert [p for p in problems if p.severity == "error"] == []
    assert [(p.model, p.severity) for p in problems] == [("queued_add_sub", "warning")]
    assert "dynamic_batching needs a batching model" in problems[0].message


@pytest.mark.slow
def test_validate_live_loads_and_answers_every_model_of_a_python_backend_style_repository(interop_repo):
    result = run_cli("validate", str(interop_repo), "--live")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 error(s), 1 warning(s)" in result.stdout
    for model in (
        "add_sub",
        "countdown",
        "running_sum",
        "auto_doubler",
        "sum_and_difference",
        "queued_add_sub",
    ):
        assert re.search(rf"{model}\s+│\s+yes\s+│\s+yes", result.stdout), result.stdout


@pytest.mark.slow
def test_sequence_model_validated_offline_keeps_its_state_across_a_real_sequence(interop_repo):
    with EmbeddedServer(interop_repo, model_control="explicit", load_models=["running_sum"]) as server:
        client = grpcclient.InferenceServerClient(server.grpc_url)
        try:
            totals = []
            for step, value in enumerate([1, 2, 3]):
                item = grpcclient.InferInput("VALUE", [1, 1], "INT32")
                item.set_data_from_numpy(np.array([[value]], dtype=np.int32))
                response = client.infer(
                    "running_sum", [item], sequence_id=42, sequence_start=step == 0, sequence_end=step == 2
                )
                totals.append(int(response.as_numpy("TOTAL")[0, 0]))
        finally:
            client.close()
    assert totals == [1, 3, 6]


def test_check_live_reports_the_auto_completed_config_of_a_config_less_model(interop_repo):
    results = {r.model: r for r in check_live(interop_repo)}
    assert results["auto_doubler"].ok, results["auto_doubler"].error
    assert results["auto_doubler"].outputs == {"Y": (1, 4)}
    assert results["countdown"].ok, results["countdown"].error


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('input [{ name: "x" data_type: 99 dims: [1] }]', "data_type 99 is not one Triton knows"),
        ("instance_group [{ kind: 7 }]", "kind 7 is not one Triton knows"),
        ("dynamic_batching { default_queue_policy { timeout_action: 5 } }", "timeout_action 5"),
        (
            'output [{ name: "y" data_type: TYPE_FP32 dims: [1] label_filename: "labels.txt" }]',
            "label file labels.txt",
        ),
    ],
)
def test_validate_lists_an_unloadable_config_as_an_error_without_a_traceback(tmp_path, text, message):
    model = tmp_path / "repo" / "m"
    (model / "1").mkdir(parents=True)
    (model / "1" / "model.py").write_text(ADD_SUB)
    (model / "config.pbtxt").write_text(f'name: "m" backend: "python" max_batch_size: 4 {text}')
    result = run_cli("validate", str(tmp_path / "repo"))
    assert result.returncode == 1
    assert message in " ".join(result.stdout.split())
    assert "Traceback" not in result.stdout + result.stderr


def test_validate_names_a_model_folder_triton_cannot_tell_the_backend_of(tmp_path):
    (tmp_path / "repo" / "mystery" / "1").mkdir(parents=True)
    problems = check_repository(tmp_path / "repo")
    assert [(p.model, p.severity) for p in problems] == [("mystery", "error")]
    assert "no config.pbtxt" in problems[0].message and "model.py" in problems[0].message
