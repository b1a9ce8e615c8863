r"""Mixed traffic over the example models and pipelines, weighted like a small production mix.

    locust -f loadtests/mixed.py --host 127.0.0.1:8001 --headless -u 12 -r 12 -t 60s --csv out/mixed

Distributed (one master, N workers; same file everywhere):

    locust -f loadtests/mixed.py --host 127.0.0.1:8001 --master --headless -u 48 -r 16 -t 60s \
        --expect-workers 2
    locust -f loadtests/mixed.py --worker --master-host 127.0.0.1      # on each worker machine / core
"""

from __future__ import annotations

from locust import constant

from tritonforge.loadtest.payloads import digits_payloads, text_payloads
from tritonforge.loadtest.user import TritonUser


def _digits(user: TritonUser) -> list:
    return digits_payloads(user.client.model_config(user.model))


class DigitsMlp(TritonUser):
    model = "digits_mlp"
    weight = 4
    wait_time = constant(0)
    payloads = staticmethod(_digits)


class DigitsVote(TritonUser):
    model = "digits_vote"
    weight = 2
    wait_time = constant(0)
    payloads = staticmethod(_digits)


class TextEmbedding(TritonUser):
    model = "text_embedding"
    weight = 1
    wait_time = constant(0)

    @staticmethod
    def payloads(user: TritonUser) -> list:  # type: ignore[override]
        return text_payloads(user.client.model_config(user.model))
