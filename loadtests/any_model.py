"""Load test any model, with inputs generated from the config the server reports.

    TRITONFORGE_MODEL=mlp locust -f loadtests/any_model.py --host 127.0.0.1:8001 --headless -u 4 -t 20s

``$TRITONFORGE_MODEL`` names the model (required); ``$TRITONFORGE_BATCH`` the rows per request (default 1).
"""

from __future__ import annotations

import os

from locust import constant

from tritonforge.loadtest.user import TritonUser


class AnyModelUser(TritonUser):
    model = os.environ.get("TRITONFORGE_MODEL", "")
    batch = int(os.environ.get("TRITONFORGE_BATCH", "1"))
    wait_time = constant(0)
