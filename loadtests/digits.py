"""Load test one digits classifier with real digits images.

    locust -f loadtests/digits.py --host 127.0.0.1:8001 --headless -u 8 -r 8 -t 20s --csv out/digits
    TRITONFORGE_MODEL=digits_random_forest locust -f loadtests/digits.py --host ...

The model is ``$TRITONFORGE_MODEL`` (default ``digits_mlp``); each request is one image of scikit-learn's
digits (batch 1), cycled.
"""

from __future__ import annotations

import os

from locust import constant

from tritonforge.loadtest.payloads import digits_payloads
from tritonforge.loadtest.user import TritonUser


class DigitsUser(TritonUser):
    model = os.environ.get("TRITONFORGE_MODEL", "digits_mlp")
    wait_time = constant(0)

    @staticmethod
    def payloads(user: TritonUser) -> list:  # type: ignore[override]
        return digits_payloads(user.client.model_config(user.model))
