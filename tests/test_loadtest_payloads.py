"""Real request data for the example models, shaped by the config the server reports."""

from __future__ import annotations

import numpy as np
import pytest
from tritonclient.grpc import model_config_pb2 as mc

from tritonforge.loadtest.payloads import SENTENCES, digits_payloads, text_payloads


def _config(max_batch_size: int, name: str, dtype: int, dims: list[int]) -> mc.ModelConfig:
    config = mc.ModelConfig(name="m", max_batch_size=max_batch_size)
    config.input.add(name=name, data_type=dtype, dims=dims)
    return config


def test_digits_payloads_are_real_images_one_per_request_under_the_models_input_name() -> None:
    pytest.importorskip("sklearn")
    payloads = digits_payloads(_config(64, "input", mc.TYPE_FP32, [64]), count=10)
    assert len(payloads) == 10
    first = payloads[0]["input"]
    assert first.shape == (1, 64) and first.dtype == np.float32
    assert first.min() >= 0 and first.max() <= 16 and first.max() > 0
    assert not np.array_equal(payloads[0]["input"], payloads[1]["input"])


def test_text_payloads_fit_a_model_without_a_batch_dim() -> None:
    payloads = text_payloads(_config(0, "TEXT", mc.TYPE_STRING, [1]))
    assert len(payloads) == len(SENTENCES)
    assert payloads[0]["TEXT"].shape == (1,) and payloads[0]["TEXT"][0] == SENTENCES[0].encode()
    batched = text_payloads(_config(8, "TEXT", mc.TYPE_STRING, [1]))
    assert batched[0]["TEXT"].shape == (1, 1)
