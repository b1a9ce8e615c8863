"""Model cache coordinator (Triton Python backend): loads a model on its first request, evicts the least
recently used idle ones under a budget. Standard library and numpy only (NVIDIA's image has no more), and
the error accounting (``tritonforge_error_accounting.py``) that the repository writer puts beside it.

Written by ``tritonforge serve --cache-max-models/--cache-max-memory`` (or ``write_cache_repository``)
into a repository of its own, beside the user's, on a server in explicit model control. It is the only
client that loads and unloads, and one instance runs one request at a time, so decisions are serialized:
two clients can never undo each other's load, and concurrent asks for one model are answered by one load.

A request carries one model name (input ``MODEL``, BYTES [1]); the answer (output ``STATE``, BYTES [1])
is a JSON object: ``{"model", "state": "ready"|"loaded", "load_ms", "evicted", "loaded_models",
"memory_bytes"}``. An empty name asks for the cache's status without loading anything.

What Triton tells it, read on each decision (nothing polls in the background):
- loaded models: the repository index (HTTP ``/v2/repository/index``);
- recency: model statistics' ``last_inference`` (HTTP ``/v2/models/stats``), and when it loaded a model;
- queued requests: the ``nv_inference_pending_request_count`` metric;
- memory: the PSS of the tritonserver process and its children, from /proc (its parent process).
Where those endpoints are comes from the server's command line (``/proc/<parent>/cmdline``), overridable
by the ``http_url`` / ``metrics_url`` parameters.

A model counts as busy (not evicted) when requests are queued for it, or it answered, was loaded or was
asked for within ``max(idle_s, 4 x its mean request time)``: Triton's statistics see a request only when
it completes, so an execution in progress shows as recent use. When every candidate is busy the cache
goes over ``max_models`` up to its ceiling (``max_loaded_models``), never past it: there, the least
recently used unit without queued requests goes (Triton finishes its executions before the unload; its
next call is a miss). Pinned models and the coordinator itself
are never evicted. An ensemble (and a model naming companions in ``tritonforge_load_with``) is one unit:
its composing models load with it, count with it, and are unloaded with it unless another loaded unit or
a pin needs them.
"""

import json
import os
import re
import time
import urllib.error
import urllib.request

import numpy as np
import triton_python_backend_utils as pb_utils
from tritonforge_error_accounting import error_counter, settle_errors

LOAD_WITH = "tritonforge_load_with"
# what the coordinator reads of a config.pbtxt (text format; we have no protobuf here)
_PLATFORM_ENSEMBLE = re.compile(r'^\s*platform\s*:\s*"ensemble"', re.M)
_STEP_MODEL = re.compile(r'\bmodel_name\s*:\s*"([^"]+)"')
_LOAD_WITH_PARAM = re.compile(
    r'key\s*:\s*"' + LOAD_WITH + r'"\s*,?\s*value\s*:?\s*\{\s*string_value\s*:\s*"([^"]*)"'
)
_PENDING = re.compile(r'^nv_inference_pending_request_count\{model="([^"]+)",version="[^"]*"\}\s+(\S+)', re.M)
_KIB = 1024


def _param(config, key, default=""):
    value = config.get("parameters", {}).get(key, {}).get("string_value", "")
    return value if value != "" else default


def _server_pid():
    """The tritonserver process: our parent (the Python backend starts its stubs itself)."""
    pid = os.getppid()
    for _ in range(4):
        try:
            with open(f"/proc/{pid}/comm") as f:
                if f.read().strip().startswith("tritonserver"):
                    return pid
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return os.getppid()


def _flags(pid):
    """tritonserver's flags as {name: [values]} (``--name=value`` and ``--name value``)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return {}
    found = {}
    i = 1
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--"):
            if "=" in arg:
                name, value = arg[2:].split("=", 1)
            elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                name, value = arg[2:], argv[i + 1]
                i += 1
            else:
                name, value = arg[2:], "true"
            found.setdefault(name, []).append(value)
        i += 1
    return found


def _url(flags, kind, port):
    address = (flags.get(f"{kind}-address") or flags.get("http-address") or ["127.0.0.1"])[-1]
    if address in ("0.0.0.0", ""):
        address = "127.0.0.1"
    if ":" in address and not address.startswith("["):
        address = f"[{address}]"
    return f"http://{address}:{(flags.get(f'{kind}-port') or [port])[-1]}"


def _descendants(pid):
    """``pid`` and every process below it."""
    children = {}
    try:
        names = os.listdir("/proc")
    except OSError:
        return [pid]
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(parent, []).append(int(name))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, ()))
    return found


def _pss_bytes(pid):
    """Proportional set size of ``pid`` (shared pages split between their users), 0 when it is gone."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * _KIB
    except (OSError, ValueError):
        pass
    return 0


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.name = args["model_name"]
        self.max_models = int(_param(config, "max_models", "0"))
        self.max_memory = int(_param(config, "max_memory_bytes", "0"))
        ceiling = self.max_models + max(1, self.max_models // 10) if self.max_models else 0
        self.ceiling = int(_param(config, "max_loaded_models", str(ceiling)))
        self.pins = {p for p in _param(config, "pins").split(",") if p}
        self.idle_s = float(_param(config, "idle_s", "2"))
        self.unload_wait_s = float(_param(config, "unload_wait_s", "30"))
        self.room_wait_s = float(_param(config, "room_wait_s", "5"))
        self.server = _server_pid()
        flags = _flags(self.server)
        self.http = _param(config, "http_url") or _url(flags, "http", "8000")
        self.metrics = _param(config, "metrics_url") or _url(flags, "metrics", "8002")
        given = [r for r in _param(config, "repositories").split(os.pathsep) if r]
        self.repositories = given or flags.get("model-repository", []) + flags.get("model-store", [])
        self.loaded_at = {}  # model -> time.time() it was loaded or last asked for
        self.evicted_at = {}  # model -> time.monotonic() of its unload, while it may still be unloading
        self.costs = []  # PSS per model measured at recent loads (bytes)
        self.peak_memory = 0
        self.totals = {"loads": 0, "evictions": 0, "failures": 0, "load_s": 0.0}
        self._metrics()
        self.error_counter = error_counter(pb_utils, args)

    # -- metrics ------------------------------------------------------------------------------------------
    def _metrics(self):
        counter, gauge = pb_utils.MetricFamily.COUNTER, pb_utils.MetricFamily.GAUGE

        self.families = []  # a family must outlive its metrics

        def metric(name, kind, text):
            self.families.append(pb_utils.MetricFamily(name=name, description=text, kind=kind))
            return self.families[-1].Metric(labels={})

        self.m_loads = metric("tritonforge_cache_loads_total", counter, "Models loaded on a first request")
        self.m_fail = metric("tritonforge_cache_load_failures_total", counter, "Loads that failed")
        self.m_evict = metric("tritonforge_cache_evictions_total", counter, "Models unloaded by the cache")
        self.m_load_s = metric("tritonforge_cache_load_seconds_total", counter, "Time spent loading")
        self.m_loaded = metric("tritonforge_cache_loaded_models", gauge, "Models loaded (the cache excepted)")
        self.m_memory = metric("tritonforge_cache_memory_bytes", gauge, "PSS of tritonserver and children")

    # -- what Triton says ---------------------------------------------------------------------------------
    def _http(self, path, body=None):
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.http + path, data=data, method="POST" if data else "GET")
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read() or b"null")

    def _states(self):
        """{model: state} of every model of the repositories Triton knows (READY, UNLOADING, ...)."""
        return {m["name"]: m.get("state", "") for m in self._http("/v2/repository/index", {}) or []}

    def _last_inference(self):
        """{model: (last inference as time.time(), mean request seconds)} for loaded models."""
        found = {}
        for stat in self._http("/v2/models/stats").get("model_stats", []):
            success = stat.get("inference_stats", {}).get("success", {})
            mean = success.get("ns", 0) / 1e9 / success["count"] if success.get("count") else 0.0
            last, old = stat.get("last_inference", 0) / 1e3, found.get(stat["name"], (0.0, 0.0))
            found[stat["name"]] = (max(last, old[0]), max(mean, old[1]))
        return found

    def _pending(self):
        try:
            with urllib.request.urlopen(self.metrics + "/metrics", timeout=10) as response:
                text = response.read().decode(errors="replace")
        except (OSError, urllib.error.URLError):
            return {}
        found = {}
        for model, value in _PENDING.findall(text):
            found[model] = found.get(model, 0) + float(value)
        return found

    def memory_bytes(self):
        total = sum(_pss_bytes(pid) for pid in _descendants(self.server))
        self.peak_memory = max(self.peak_memory, total)
        self.m_memory.set(total)
        return total

    # -- the repository's configs ------------------------------------------------------------------------
    def _config_text(self, model):
        for repo in self.repositories:
            path = os.path.join(repo, model, "config.pbtxt")
            if os.path.isfile(path):
                with open(path, encoding="utf-8") as f:
                    return f.read()
            if os.path.isdir(os.path.join(repo, model)):
                return ""  # a model without config.pbtxt (Triton may auto-complete it)
        return None

    def unit(self, model, seen=None):
        """``model`` and every model loading with it (an ensemble's steps, ``tritonforge_load_with``),
        companions first; ``None`` when no repository has ``model``."""
        seen = set() if seen is None else seen
        if model in seen:
            return []
        seen.add(model)
        text = self._config_text(model)
        if text is None:
            return None
        parts = []
        if _PLATFORM_ENSEMBLE.search(text):
            parts += _STEP_MODEL.findall(text)
        for found in _LOAD_WITH_PARAM.findall(text):
            parts += [c for c in found.split(",") if c]
        members = []
        for part in parts:
            for member in self.unit(part, seen) or [part]:
                if member not in members:
                    members.append(member)
        return [*members, model]

    # -- decisions ---------------------------------------------------------------------------------------
    def _evictable(self, states, protect, recency=True):
        """Units that may go, least recently used first: [(recency, [models])]. ``recency=False``: a unit
        used lately may go too (only queued requests keep it)."""
        ready = [m for m, s in states.items() if s == "READY" and m != self.name]
        units = {m: self.unit(m) or [m] for m in ready}
        members_of_others = {}
        for root, members in units.items():
            for member in members[:-1]:
                members_of_others.setdefault(member, set()).add(root)
        last, pending, now = self._last_inference(), self._pending(), time.time()

        def busy(model):
            used, mean = last.get(model, (0.0, 0.0))
            window = max(self.idle_s, 4 * mean)
            recent = max(used, self.loaded_at.get(model, 0.0))
            return pending.get(model, 0) > 0 or (recency and now - recent < window)

        keep = set(self.pins) | set(protect) | {self.name}
        for pin in list(keep):
            keep.update(units.get(pin, []))
        for root in ready:
            if busy(root):
                keep.update(units[root])
        choices = []
        for root, members in units.items():
            if root in keep or root in members_of_others:
                continue  # a composing model goes with (one of) its ensembles, not alone
            going = [root]
            for member in members[:-1]:
                others = members_of_others.get(member, set()) - {root}
                if member not in keep and not any(states.get(o) == "READY" for o in others):
                    going.insert(0, member)
            recency = max(max(last.get(m, (0.0,))[0], self.loaded_at.get(m, 0.0)) for m in members)
            choices.append((recency, going))
        choices.sort(key=lambda c: c[0])
        return choices

    def _next_unit(self, states, protect, evicted, recency=True):
        """The least recently used unit that may go and has nothing evicted already, or None."""
        for _, going in self._evictable(states, protect, recency):
            if not set(going) & set(evicted):
                return going
        return None

    def _evict(self, unit, evicted):
        for model in reversed(unit):  # the ensemble first, then what it composed
            pb_utils.unload_model(model_name=model, unload_dependents=False)
            self.loaded_at.pop(model, None)
            self.evicted_at[model] = time.monotonic()
            evicted.append(model)
            self.totals["evictions"] += 1
            self.m_evict.increment(1)

    def _until(self, done, timeout_s, pause_s):
        """Read Triton's model states until ``done(states)`` holds, at most ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if done(self._states()):
                return
            time.sleep(pause_s)

    def _wait_unloaded(self, models):
        """Until Triton has finished unloading ``models`` (their processes gone), at most unload_wait_s."""

        def gone(states):
            return not any(states.get(m) in ("READY", "UNLOADING") for m in models)

        if models:
            self._until(gone, self.unload_wait_s, 0.05)

    def _wait_for_room(self, adding):
        """Models this coordinator unloaded keep their processes until Triton has finished them (about a
        second for a Python model): before ``adding`` more, wait until the loaded ones and those together
        fit the ceiling, at most room_wait_s. A model unloading for longer than that is held by something
        else (an open stream, an execution that doesn't end): waiting would not free it, so it is not
        counted. Nothing unloading: nothing to wait for (past the ceiling, make_room decided)."""
        now = time.monotonic()
        self.evicted_at = {m: t for m, t in self.evicted_at.items() if now - t < self.room_wait_s}
        if not (self.max_models and self.evicted_at):
            return

        def fits(states):
            unloading = sum(1 for m in self.evicted_at if states.get(m) == "UNLOADING")
            return not unloading or self._loaded_count(states) + unloading + adding <= self.ceiling

        self._until(fits, self.room_wait_s, 0.02)

    def _loaded_count(self, states):
        return sum(1 for m, s in states.items() if s == "READY" and m != self.name)

    def make_room(self, unit, states, wait=True):
        """Evict until ``unit``'s missing models fit both budgets; returns the models evicted. When every
        candidate is busy, waits (``wait``: at most idle_s) for one to turn idle, then goes over budget
        rather than fail the request; the next decision trims back."""
        missing = [m for m in unit if states.get(m) != "READY"]
        evicted = []
        give_up = time.monotonic() + (self.idle_s if wait else 0.0)
        while self.max_models and self._loaded_count(states) - len(evicted) + len(missing) > self.max_models:
            going = self._next_unit(states, unit, evicted)
            if going:
                self._evict(going, evicted)
            elif time.monotonic() < give_up:
                time.sleep(0.05)
            else:
                break
        # every candidate is busy: over max_models, never over the ceiling. Past it the least recently used
        # unit without queued requests goes (Triton finishes its executions; its next call is a miss)
        while self.max_models and self._loaded_count(states) - len(evicted) + len(missing) > self.ceiling:
            going = self._next_unit(states, unit, evicted, recency=False)
            if not going:
                break
            self._evict(going, evicted)
        if self.max_memory and self.costs:
            cost = sorted(self.costs)[len(self.costs) // 2] * len(missing)
            while self.memory_bytes() + cost > self.max_memory:
                going = self._next_unit(states, unit, evicted)
                if going:
                    self._evict(going, evicted)
                    self._wait_unloaded(going)
                elif time.monotonic() < give_up:
                    time.sleep(0.05)
                else:
                    break
        return evicted

    def ensure(self, model):
        states = self._states()
        answer = {"model": model, "state": "ready", "load_ms": 0.0, "evicted": []}
        unit = self.unit(model)
        if unit is None:
            raise pb_utils.TritonModelException(
                f"model '{model}' is in none of the server's repositories {self.repositories}"
            )
        if all(states.get(m) == "READY" for m in unit):
            for m in unit:
                self.loaded_at[m] = max(self.loaded_at.get(m, 0.0), time.time())
            if self.max_models and self._loaded_count(states) > self.max_models:
                answer["evicted"] = self.make_room(unit, states, wait=False)  # over since a busy spell
            return answer
        before = self.memory_bytes() if self.max_memory else 0
        answer["evicted"] = self.make_room(unit, states)
        start = time.monotonic()
        missing = [m for m in unit if states.get(m) != "READY"]
        self._wait_unloaded([m for m in missing if states.get(m) == "UNLOADING"])  # evicted a moment ago
        self._wait_for_room(len(missing))
        try:
            for member in unit:
                if states.get(member) != "READY":
                    pb_utils.load_model(model_name=member)
        except Exception as exc:
            self.totals["failures"] += 1
            self.m_fail.increment(1)
            raise pb_utils.TritonModelException(f"the cache could not load model '{model}': {exc}") from None
        took = time.monotonic() - start
        now = time.time()
        for member in unit:
            self.loaded_at[member] = now
        self.totals["loads"] += 1
        self.totals["load_s"] += took
        self.m_loads.increment(1)
        self.m_load_s.increment(took)
        answer.update(state="loaded", load_ms=took * 1e3)
        if self.max_memory:
            after = self.memory_bytes()
            if missing and after > before:
                self.costs = [*self.costs[-19:], (after - before) / len(missing)]
            if after > self.max_memory:  # the estimate was low: make room now, the new unit excepted
                states, evicted = self._states(), answer["evicted"]
                while self.memory_bytes() > self.max_memory:
                    going = self._next_unit(states, unit, evicted)
                    if not going:
                        break
                    self._evict(going, evicted)
                    self._wait_unloaded(going)
        return answer

    def status(self, answer):
        states = self._states()
        answer["loaded_models"] = self._loaded_count(states)
        answer["memory_bytes"] = self.memory_bytes()
        answer["peak_memory_bytes"] = self.peak_memory
        answer["max_models"] = self.max_models
        answer["max_loaded_models"] = self.ceiling
        answer["max_memory_bytes"] = self.max_memory
        answer["pins"] = sorted(self.pins)
        answer.update(self.totals)
        self.m_loaded.set(answer["loaded_models"])
        return answer

    def execute(self, requests):
        # never raises: Triton 2.51 can lose a request of an execute that raises while others are in
        # flight (its caller would wait for its deadline); errors count in tritonforge_error_responses_total
        return settle_errors(pb_utils, self._execute(requests), self.error_counter)

    def _execute(self, requests):
        responses = []
        for request in requests:
            try:
                # the caller gave up while queued: don't load for nobody
                if getattr(request, "is_cancelled", lambda: False)():
                    raise pb_utils.TritonModelException("cancelled by the caller before the load began")
                raw = pb_utils.get_input_tensor_by_name(request, "MODEL").as_numpy().reshape(-1)
                model = raw[0].decode() if isinstance(raw[0], bytes) else str(raw[0])
                answer = self.ensure(model) if model else {"model": "", "state": "status", "evicted": []}
                answer = self.status(answer)
                out = np.array([json.dumps(answer).encode()], dtype=np.object_)
                responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("STATE", out)]))
            except Exception as exc:
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc))))
        return responses
