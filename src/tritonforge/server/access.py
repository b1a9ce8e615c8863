"""One access rule for both of Triton's protocols: a group restricted on gRPC is restricted on HTTP too.

Triton restricts its gRPC protocol groups (``--grpc-restricted-protocol``) and its HTTP APIs
(``--http-restricted-api``) separately, under the same group names. A key on gRPC inference with HTTP left
open is no key at all: ``POST /v2/models/<m>/infer`` answers anyone. :func:`restrict_both` mirrors each
restriction onto the protocol that lacks it (same header, same key), or, told to keep each protocol as
given, says which groups are open on one side.

Example:
    >>> plan = restrict_both(["inference,statistics:infer-key=s3cret"], [])
    >>> plan.http
    ('inference,statistics:infer-key=s3cret',)
    >>> plan.mirrored
    {'HTTP': ('inference', 'statistics')}
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

from tritonforge.errors import ServerError
from tritonforge.server.launch import flag_values

__all__ = ["RESTRICTABLE_GROUPS", "AccessPlan", "RestrictionScope", "restrict_both"]

#: The group names Triton 2.51 takes on both protocols (its ``--help`` lists the same nine for each; an
#: unknown one stops it at start with a usage dump).
RESTRICTABLE_GROUPS = (
    "health",
    "metadata",
    "inference",
    "shared-memory",
    "model-config",
    "model-repository",
    "statistics",
    "trace",
    "logging",
)
_SPEC = re.compile(r"^(?P<groups>[^:=\s]+):(?P<key>[^=\s]+)=(?P<value>.*)$", re.DOTALL)
_FLAG = {"gRPC": "--grpc-restricted-protocol", "HTTP": "--http-restricted-api"}


class RestrictionScope(str, Enum):
    """Where a restriction given for one protocol applies."""

    both = "both"  # on gRPC and HTTP alike (the protocol that lacks it gets the same header and key)
    as_given = "as-given"  # only on the protocol it was given for


@dataclass(frozen=True)
class AccessPlan:
    """The restricted-protocol specs to start Triton with, and one line saying what they do.

    ``grpc`` / ``http``: every spec for that protocol (those given, then those mirrored onto it);
    ``mirrored``: ``{"gRPC" | "HTTP": groups}`` added by mirroring; ``one_sided``: ``{"gRPC" | "HTTP":
    groups}`` restricted on that protocol only (``as-given``).
    """

    grpc: tuple[str, ...]
    http: tuple[str, ...]
    mirrored: dict[str, tuple[str, ...]]
    one_sided: dict[str, tuple[str, ...]]
    summary: str


def _parse(specs: Sequence[str], protocol: str) -> dict[str, tuple[str, str]]:
    """{group: (header, value)} of one protocol's specs.

    Raises:
        ServerError: a malformed spec, an unknown group, or a group given twice (Triton refuses both).
    """
    groups: dict[str, tuple[str, str]] = {}
    for spec in specs:
        match = _SPEC.match(spec)
        head = spec.partition("=")[0]
        if match is None:
            raise ServerError(
                f"{_FLAG[protocol]} {head!r}=...: expected '<group>[,<group>...]:<header>=<key>', e.g. "
                "'inference:infer-key=env:INFER_KEY'"
            )
        for group in match["groups"].split(","):
            if group not in RESTRICTABLE_GROUPS:
                raise ServerError(
                    f"{_FLAG[protocol]} {head!r}=...: unknown group {group!r}; Triton's groups are "
                    f"{', '.join(RESTRICTABLE_GROUPS)}"
                )
            if group in groups:
                raise ServerError(
                    f"{_FLAG[protocol]}: group {group!r} is restricted twice (Triton takes one header and "
                    "key per group and protocol); give it in one spec"
                )
            groups[group] = (match["key"], match["value"])
    return groups


def _specs(groups: dict[str, tuple[str, str]]) -> tuple[str, ...]:
    """One spec per (header, value), its groups in Triton's order."""
    by_key: dict[tuple[str, str], list[str]] = {}
    for group in RESTRICTABLE_GROUPS:
        if group in groups:
            by_key.setdefault(groups[group], []).append(group)
    return tuple(f"{','.join(names)}:{key}={value}" for (key, value), names in by_key.items())


def restrict_both(
    grpc: Sequence[str],
    http: Sequence[str],
    scope: RestrictionScope | str = RestrictionScope.both,
    *,
    extra_args: Sequence[str] = (),
) -> AccessPlan:
    """The restricted-protocol specs for both protocols: ``grpc`` and ``http`` as given and, with
    ``scope="both"``, each group restricted on one protocol only added to the other with the same header
    and key. ``extra_args``: arguments that reach tritonserver as they are (``serve``'s after ``--``): their
    restrictions count, and are never repeated (Triton refuses a group given twice for one protocol).

    Specs are Triton's ``"<group>[,<group>...]:<header>=<value>"``; the value may be a reference
    (``env:NAME``, ``@FILE``) still to be read: it is copied as it is, and never shown in ``summary``.

    Raises:
        ServerError: a malformed spec, an unknown group, or a group restricted twice on one protocol.
    """
    scope = RestrictionScope(scope)
    given = {
        "gRPC": _parse([*grpc, *flag_values(extra_args, _FLAG["gRPC"])], "gRPC"),
        "HTTP": _parse([*http, *flag_values(extra_args, _FLAG["HTTP"])], "HTTP"),
    }
    added: dict[str, dict[str, tuple[str, str]]] = {"gRPC": {}, "HTTP": {}}
    one_sided: dict[str, tuple[str, ...]] = {}
    for side, other in (("gRPC", "HTTP"), ("HTTP", "gRPC")):
        lone = {g: kv for g, kv in given[side].items() if g not in given[other]}
        if not lone:
            continue
        if scope is RestrictionScope.both:
            added[other].update(lone)
        else:
            one_sided[side] = tuple(g for g in RESTRICTABLE_GROUPS if g in lone)
    mirrored = {
        side: tuple(g for g in RESTRICTABLE_GROUPS if g in groups) for side, groups in added.items() if groups
    }
    restricted = [g for g in RESTRICTABLE_GROUPS if g in given["gRPC"] or g in given["HTTP"]]
    if not restricted:
        summary = "access: no group is restricted (gRPC and HTTP answer anyone)"
    elif one_sided:
        open_on = "; ".join(
            f"{', '.join(groups)} restricted on {side} only, open on {'HTTP' if side == 'gRPC' else 'gRPC'}"
            for side, groups in one_sided.items()
        )
        summary = f"access: {open_on} (--restriction-scope as-given; 'both' restricts both protocols)"
    else:
        summary = f"access: {', '.join(restricted)} restricted on gRPC and HTTP alike"
        if mirrored:
            summary += (
                " ("
                + "; ".join(f"mirrored onto {side}: {', '.join(g)}" for side, g in mirrored.items())
                + ")"
            )
    return AccessPlan(
        grpc=(*grpc, *_specs(added["gRPC"])),
        http=(*http, *_specs(added["HTTP"])),
        mirrored=mirrored,
        one_sided=one_sided,
        summary=summary,
    )
