"""Hypothesis strategies for hostile input, shared by the property-based suites of files, names and requests.

Every strategy draws what a careless or hostile user can hand the tools: names with control, bidi and shell
characters, numbers at and beyond the limits of int32 / int64 / float, YAML texts with duplicate keys,
aliases, tags and deep nesting, JSON lines of every shape. ``BOUNDED`` is the settings profile each such
test runs under: few examples, derandomized (a CI failure reproduces locally), no example database, and a
deadline, so the suite stays fast and a hang fails instead of stalling.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir

# Hypothesis caches on disk even without an example database: a per-process temp folder, removed at exit.
_HOME = Path(tempfile.gettempdir()) / f"tritonforge-hypothesis-{os.getpid()}"
set_hypothesis_home_dir(_HOME)
atexit.register(shutil.rmtree, _HOME, ignore_errors=True)

BOUNDED = settings(
    max_examples=60,
    derandomize=True,
    database=None,
    deadline=2_000,  # milliseconds per example: a slow box is fine, a hang is not
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

#: characters that break shells, terminals, PromQL, YAML or paths
NASTY_CHARS = [
    "\n", "\t", "\r", "\x00", "\x1b", "\x7f", "\u202e", "\u200b", "\ufeff", " ", "*", "?", ";", "$", "`", "'",
    '"', "\\", "/", "{", "}", "[", "]", "#", "|", "&", "<", ">", "(", ")", "%", ":", ",", "=", "é", "🙂",
]  # fmt: skip

#: integers at and beyond the edges of the protobuf fields (int32, int64, uint64) and of float
EDGE_INTS = [
    -1, 0, 1, 2**31 - 1, 2**31, 2**32, 2**63 - 1, 2**63, 2**64, 2**64 + 1, -(2**63), 10**30, 10**400,
]  # fmt: skip
EDGE_FLOATS = [0.0, -0.0, 1e-300, 1e300, float("nan"), float("inf"), float("-inf")]


def hostile_names() -> st.SearchStrategy[str]:
    """Model, tensor or pipeline names: plain ones, and ones holding the characters above."""
    plain = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,20}", fullmatch=True)
    nasty = st.lists(st.sampled_from(NASTY_CHARS) | st.characters(), min_size=0, max_size=8).map("".join)
    mixed = st.tuples(plain, nasty, plain).map("".join)
    return st.one_of(plain, nasty, mixed, st.just(""), st.just("."), st.just(".."), st.just("x" * 300))


def edge_numbers() -> st.SearchStrategy[Any]:
    """Numbers a config or an SLO file may hold, edges first, and values of the wrong type."""
    return st.one_of(
        st.sampled_from(EDGE_INTS),
        st.sampled_from(EDGE_FLOATS),
        st.integers(),
        st.floats(allow_nan=True, allow_infinity=True),
        st.sampled_from([True, None, "5", [], {}]),
    )


def yaml_scalars() -> st.SearchStrategy[str]:
    """YAML scalar texts, quoted or not: numbers, specials (.nan, .inf, ~, yes), tags, long ones."""
    special = st.sampled_from(
        [".nan", ".inf", "-.inf", "~", "null", "yes", "no", "0x1F", "1e400", "!!binary aGk=", "!!python/none",
         "&a 1", "*a", "'quoted'", '"esc\\u202e"', "|\n  block", "9" * 5000]
    )  # fmt: skip
    return st.one_of(special, st.integers().map(str), hostile_names().map(json.dumps))


def yaml_documents() -> st.SearchStrategy[str]:
    """Whole YAML texts: mappings with duplicate keys, alias chains, deep nesting, several documents."""
    key = st.sampled_from(["name", "models", "steps", "window", "m", "1", "x"])
    line = st.tuples(key, yaml_scalars()).map(lambda kv: f"{kv[0]}: {kv[1]}")
    mapping = st.lists(line, min_size=0, max_size=6).map("\n".join)
    nested = st.integers(1, 200).map(lambda n: "a: " + "[" * n + "]" * n)
    bomb = st.integers(2, 9).map(
        lambda n: (
            "a0: &a0 [x, x]\n"
            + "".join(f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}]\n" for i in range(1, n))
        )
    )
    multi = st.lists(mapping, min_size=2, max_size=3).map("\n---\n".join)
    return st.one_of(mapping, nested, bomb, multi, st.text(max_size=200))


def json_lines() -> st.SearchStrategy[bytes]:
    """Lines of a JSON-lines log: events, other JSON values, broken JSON, invalid UTF-8, deep nesting."""
    field = st.sampled_from(["at", "by", "action", "model", "reason", "version", "from", "to"])
    value = st.one_of(
        hostile_names(), edge_numbers().filter(lambda v: v == v), st.lists(st.integers(), max_size=3)
    )
    event = st.dictionaries(field, value, max_size=6).map(lambda d: json.dumps(d, default=str).encode())
    return st.one_of(
        event,
        st.sampled_from([b"[1, 2]", b"5", b"null", b'"text"', b"{", b"not json", b"\xff\xfe", b"{}"]),
        st.integers(10, 3000).map(lambda n: b"[" * n + b"]" * n),
        st.binary(max_size=60),
    )
