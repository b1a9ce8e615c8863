"""Load test the ``digits_vote`` pipeline (three classifiers in parallel, then a vote) with real images.

locust -f loadtests/digits_vote.py --host 127.0.0.1:8001 --headless -u 8 -r 8 -t 20s --csv out/vote
"""

from __future__ import annotations

import os

from locust import constant

from tritonforge.loadtest.payloads import digits_payloads
from tritonforge.loadtest.user import TritonUser


class DigitsVoteUser(TritonUser):
    model = os.environ.get("TRITONFORGE_MODEL", "digits_vote")
    wait_time = constant(0)

    @staticmethod
    def payloads(user: TritonUser) -> list:  # type: ignore[override]
        return digits_payloads(user.client.model_config(user.model))
