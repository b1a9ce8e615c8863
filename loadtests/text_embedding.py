"""Load test the ``text_embedding`` pipeline (tokenizer -> MiniLM encoder -> mean pooling) with sentences.

locust -f loadtests/text_embedding.py --host 127.0.0.1:8001 --headless -u 4 -r 4 -t 20s --csv out/text
"""

from __future__ import annotations

import os

from locust import between

from tritonforge.loadtest.payloads import text_payloads
from tritonforge.loadtest.user import TritonUser


class TextEmbeddingUser(TritonUser):
    model = os.environ.get("TRITONFORGE_MODEL", "text_embedding")
    wait_time = between(0, 0.05)

    @staticmethod
    def payloads(user: TritonUser) -> list:  # type: ignore[override]
        return text_payloads(user.client.model_config(user.model))
