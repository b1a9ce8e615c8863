"""The one walk over an ensemble's composing models (tritonforge.config.ComposingWalk)."""

from __future__ import annotations

from tritonforge.config import ComposingWalk


def walk(graph: dict[str, list[str]], model: str) -> tuple[str, ...]:
    steps = ComposingWalk(model)
    for name in steps:
        steps.add(graph.get(name, []))
    return steps.found


def test_breadth_first_each_once_through_diamonds_and_cycles() -> None:
    graph = {
        "pipe": ["tok", "inner", "tok"],
        "inner": ["enc", "pool"],
        "enc": [],
        "pool": ["pipe"],  # a cycle back: visited once
    }
    assert walk(graph, "pipe") == ("pipe", "tok", "inner", "enc", "pool")


def test_a_plain_model_is_its_own_walk() -> None:
    assert walk({}, "resnet") == ("resnet",)
