"""Canary splitter (Triton Python backend, BLS): serves a model's name during a rollout.

Written by ``tritonforge rollout`` in place of the model being rolled out, so apps keep calling the same
name. Each request goes to the stable or the candidate version of the rollout's twin model (which holds
both versions) by the weight in the rollout's state file, re-read whenever it changes. A request sent to
the candidate is mirrored to stable in parallel: their outputs are compared (agreement), and when the
candidate fails or answers later than ``candidate_timeout_ms`` the app gets stable's answer, so a bad
candidate costs no failed requests. In the *shadow* step (``"shadow": true`` in the state) the app always
gets stable's answer: the candidate only sees mirrored traffic. A candidate call counts as the
candidate's error only when stable answered the same request (both failing is the server's trouble, not
the candidate's). A server restarted in explicit mode without the twin gets it loaded by the splitter's first
request. Per-arm counts, errors, a latency histogram and the agreement counts are written
(atomically) to a stats file per instance beside the state file for the controller to judge.
Needs numpy only, and the error accounting (``tritonforge_error_accounting.py``) that the repository
writer puts beside it.
"""

import asyncio
import json
import os
import random
import time

import numpy as np
import triton_python_backend_utils as pb_utils
from tritonforge_error_accounting import error_counter, settle_errors

# latency histogram bucket upper bounds in ms: 0.05 ms .. ~60 s, 10 % apart
BOUNDS_MS = [0.05 * 1.1**i for i in range(148)]


def _bucket(ms):
    low, high = 0, len(BOUNDS_MS)
    while low < high:
        mid = (low + high) // 2
        if BOUNDS_MS[mid] < ms:
            low = mid + 1
        else:
            high = mid
    return low  # == len(BOUNDS_MS) for anything slower than the last bound


class _Arm:
    def __init__(self):
        self.calls = 0
        self.errors = 0
        self.timeouts = 0
        self.hist = [0] * (len(BOUNDS_MS) + 1)

    def record(self, ms, ok, timed_out=False):
        self.calls += 1
        if not ok:
            self.errors += 1
        if timed_out:
            self.timeouts += 1
        self.hist[_bucket(ms)] += 1

    def as_dict(self):
        return {"calls": self.calls, "errors": self.errors, "timeouts": self.timeouts, "hist": self.hist}


class TritonPythonModel:
    def initialize(self, args):
        self.error_counter = error_counter(pb_utils, args)
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.target = params["rollout_target"]
        root = os.path.dirname(os.path.abspath(args["model_repository"]))
        self.state_path = os.path.join(root, params["rollout_state"])
        tag = f"{os.getpid()}-{args['model_instance_name']}".replace("/", "_")
        self.stats_path = os.path.join(root, f"{params['rollout_stats']}{tag}.json")
        self.inputs = [i["name"] for i in config["input"]]
        self.outputs = [o["name"] for o in config["output"]]
        self.dtypes = {o["name"]: pb_utils.triton_string_to_numpy(o["data_type"]) for o in config["output"]}
        self.state = {}
        self.state_mtime = None
        self.checked_at = 0.0
        self.arms = {"stable": _Arm(), "candidate": _Arm()}
        self.compared = 0
        self.agreed = 0
        self.disagreements = []
        self.written_at = 0.0
        self.twin_checked = False
        self._read_state(force=True)

    def _read_state(self, force=False):
        now = time.monotonic()
        if not force and now - self.checked_at < 0.1:
            return
        self.checked_at = now
        try:
            mtime = os.stat(self.state_path).st_mtime_ns
            if mtime != self.state_mtime:
                with open(self.state_path, encoding="utf-8") as handle:
                    self.state = json.load(handle)
                self.state_mtime = mtime
        except (OSError, ValueError):
            pass  # keep the last weights read: the controller replaces the file atomically

    def _write_stats(self, force=False):
        now = time.monotonic()
        if not force and now - self.written_at < 0.2:
            return
        self.written_at = now
        if not os.path.exists(self.state_path):
            return  # the rollout is over (or being cleaned up): leave no counters behind
        record = {
            "at": time.time(),
            "arms": {name: arm.as_dict() for name, arm in self.arms.items()},
            "compared": self.compared,
            "agreed": self.agreed,
            "disagreements": self.disagreements[-5:],
            "bounds_ms": BOUNDS_MS,
        }
        tmp = self.stats_path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(record, handle, default=str)
        os.replace(tmp, self.stats_path)

    async def execute(self, requests):
        self._read_state()
        if not self.twin_checked:
            self._load_twin()
        responses = await asyncio.gather(*[self._answer(r) for r in requests])
        self._write_stats()
        # never raise: Triton 2.51 now and then loses a request of an execute that raises under concurrent
        # requests, which keeps this version UNLOADING for good once the rollout replaces it
        return settle_errors(pb_utils, responses, self.error_counter)

    def _load_twin(self):
        """A server (re)started in explicit mode with only the model's name loaded has no twin: load it
        before the first answer, so the first requests wait for it instead of failing. Once per instance,
        and only while the rollout runs (never while the controller takes the split down). Servers in poll
        or none mode load the twin themselves and refuse the request, which is fine."""
        self.twin_checked = True
        if self.state.get("phase") not in ("preparing", "running", "paused"):
            return
        try:
            if not pb_utils.is_model_ready(self.target):
                pb_utils.load_model(self.target)
        except Exception:
            pass  # the controller (or `rollout resume`) loads it, and says so if it can't

    async def _answer(self, request):
        try:
            tensors = {}
            for name in self.inputs:
                tensor = pb_utils.get_input_tensor_by_name(request, name)
                if tensor is not None:
                    tensors[name] = tensor.as_numpy()
            state = self.state
            weight = float(state.get("weight", 0.0))
            if weight > 0 and random.random() * 100.0 < weight:
                outputs = await self._canary(tensors, state, shadow=bool(state.get("shadow")))
            else:
                outputs, error = await self._timed("stable", tensors, int(state["stable"]), None)
                if error is not None:
                    raise RuntimeError(error)
            out = [
                pb_utils.Tensor(n, np.ascontiguousarray(outputs[n]).astype(self.dtypes[n]))
                for n in self.outputs
            ]
            return pb_utils.InferenceResponse(output_tensors=out)
        except Exception as exc:
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(f"{self.target} (rollout): {exc}"))

    async def _canary(self, tensors, state, shadow=False):
        timeout = state.get("candidate_timeout_ms")
        stable_task = asyncio.ensure_future(self._timed("stable", tensors, int(state["stable"]), None))
        candidate_task = self._timed("candidate", tensors, int(state["candidate"]), timeout, record=False)
        candidate, c_error, c_ms, c_late = await candidate_task
        stable, s_error = await stable_task
        if candidate is not None or stable is not None:
            # both failing is the server's trouble (e.g. the twin not loaded), not the candidate's
            self.arms["candidate"].record(c_ms, candidate is not None, timed_out=c_late)
        if candidate is not None and stable is not None:
            self._compare(stable, candidate, state)
        if shadow:
            if stable is not None:
                return stable  # shadow: the candidate is judged, never heard
            raise RuntimeError(f"stable: {s_error}")
        if candidate is not None:
            return candidate
        if stable is not None:
            return stable  # the candidate failed or was too slow: the app gets stable's answer
        raise RuntimeError(f"candidate: {c_error}; stable: {s_error}")

    async def _timed(self, arm, tensors, version, timeout_ms, record=True):
        start = time.perf_counter()
        result, error, late = None, None, False
        try:
            pending = self._call(tensors, version)
            if timeout_ms:
                result = await asyncio.wait_for(pending, float(timeout_ms) / 1000.0)
            else:
                result = await pending
        except asyncio.TimeoutError:
            error, late = f"no answer within {timeout_ms} ms", True
        except Exception as exc:
            error = str(exc)
        ms = (time.perf_counter() - start) * 1000.0
        if not record:
            return result, error, ms, late
        self.arms[arm].record(ms, error is None, timed_out=late)
        return result, error

    async def _call(self, tensors, version):
        inputs = [pb_utils.Tensor(n, np.ascontiguousarray(v)) for n, v in tensors.items()]
        response = await pb_utils.InferenceRequest(
            model_name=self.target,
            model_version=version,
            requested_output_names=self.outputs,
            inputs=inputs,
        ).async_exec()
        if response.has_error():
            raise RuntimeError(response.error().message())
        return {n: pb_utils.get_output_tensor_by_name(response, n).as_numpy() for n in self.outputs}

    def _compare(self, stable, candidate, state):
        atol = float(state.get("agreement_atol", 1e-3))
        rtol = float(state.get("agreement_rtol", 1e-3))
        rows = None
        for name in self.outputs:
            a, b = stable[name], candidate[name]
            if a.shape != b.shape:
                same = np.zeros(a.shape[0] if a.ndim else 1, dtype=bool)
            elif a.dtype.kind in "fc":
                close = np.isclose(a, b, rtol=rtol, atol=atol)
                same = close.reshape(close.shape[0], -1).all(axis=1) if close.ndim > 1 else close.reshape(-1)
            else:
                eq = np.asarray(a == b)
                same = eq.reshape(eq.shape[0], -1).all(axis=1) if eq.ndim > 1 else eq.reshape(-1)
            rows = same if rows is None else rows & same
        if rows is None:
            return
        self.compared += int(rows.size)
        self.agreed += int(rows.sum())
        if not rows.all() and len(self.disagreements) < 50:
            name = self.outputs[0]
            row = int(np.flatnonzero(~rows)[0])
            self.disagreements.append(
                {
                    "output": name,
                    "stable": np.asarray(stable[name])[row].ravel()[:4].tolist(),
                    "candidate": np.asarray(candidate[name])[row].ravel()[:4].tolist(),
                }
            )
