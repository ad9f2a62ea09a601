"""Sharding: which replica holds which site.

``MQTT_SHARD=i/N`` names this replica's shard directly; ``MQTT_SHARDS=N`` takes ``i`` from
the host name of a StatefulSet pod (``<name>-<i>``). A site belongs to the shard with the
highest rendezvous score for its name (highest random weight hashing): every replica
computes the same owner without talking to the others, a replica restart moves no site,
and going from N to N+1 shards moves only the sites the new shard wins, about 1/(N+1).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol, TypeVar

import marshmallow as ma

#: The ordinal of a StatefulSet pod: the digits after the last '-' of its name.
_ORDINAL_RE = re.compile(r"-(\d{1,6})$")
#: More shards than this is a typo, not a deployment.
MAX_SHARDS = 10_000
#: A Deployment pod name: ``<name>-<pod-template-hash>-<5 random>``, both suffixes drawn from
#: Kubernetes' safe alphabet (no vowels, no 0, 1, 3), the hash 8 to 10 characters long.
_DEPLOYMENT_POD_RE = re.compile(r".+-[bcdfghjklmnpqrstvwxz2456789]{8,10}"
                                r"-[bcdfghjklmnpqrstvwxz2456789]{5}")


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` (0-based) of ``count``."""

    index: int
    count: int

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def owns(self, site_name: str) -> bool:
        return self.count == 1 or owner(site_name, self.count) == self.index


def score(site_name: str, shard: int) -> int:
    """The rendezvous weight of ``site_name`` on ``shard``: 64 bits of BLAKE2b, stable across
    processes, versions and platforms (unlike ``hash()``)."""
    digest = hashlib.blake2b(f"{shard}\x00{site_name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def owner(site_name: str, count: int) -> int:
    """The shard (0..count-1) that holds ``site_name``."""
    return max(range(count), key=lambda shard: score(site_name, shard))


class _Named(Protocol):
    @property
    def name(self) -> str: ...


_T = TypeVar("_T", bound=_Named)


def select(items: Iterable[_T], shard: Shard | None) -> tuple[_T, ...]:
    """The items (sites) whose name the shard owns; all of them without sharding."""
    if shard is None or shard.count == 1:
        return tuple(items)
    return tuple(item for item in items if shard.owns(item.name))


def spread(names: Iterable[str], count: int) -> list[int]:
    """How many of ``names`` each shard 0..count-1 holds."""
    held = [0] * count
    for name in names:
        held[owner(name, count)] += 1
    return held


def instance_id_warning(instance_id: str) -> str | None:
    """Why an instance ID that looks like a Deployment pod name is a problem, or None."""
    if _DEPLOYMENT_POD_RE.fullmatch(instance_id) is None:
        return None
    return (f"the instance ID {instance_id[:64]!r} looks like a Deployment pod name: client IDs "
            "(<site>_i<ID>) will change at every rollout, and with MQTT_CLEAN_SESSION=false "
            "each rollout leaves a session per site on the broker; run a StatefulSet (stable "
            "pod names) or set MQTT_INSTANCE_ID to a stable value (docs/scaling.md)")


def parse_shard(value: str) -> Shard | None:
    """``MQTT_SHARD``: ``i/N`` with 0 <= i < N; empty: not set."""
    value = value.strip()
    if not value:
        return None
    index, sep, count = value.partition("/")
    if not sep or not index.strip().isdigit() or not count.strip().isdigit():
        raise ma.ValidationError(f"must be i/N (shard i of N, 0 <= i < N), got {value!r}")
    shard = Shard(int(index), int(count))
    if not 1 <= shard.count <= MAX_SHARDS:
        raise ma.ValidationError(f"N must be 1..{MAX_SHARDS}, got {shard.count}")
    if shard.index >= shard.count:
        raise ma.ValidationError(f"i must be below N (0..{shard.count - 1}), got {shard.index}")
    return shard


def ordinal_problem(hostname: str, count: int) -> tuple[Shard | None, str | None]:
    """``MQTT_SHARDS=count``: this replica's shard from a StatefulSet pod name, or why not."""
    match = _ORDINAL_RE.search(hostname)
    if match is None:
        return None, (f"the host name {hostname[:64]!r} does not end in -<ordinal> (a "
                      "StatefulSet pod name); set MQTT_SHARD=i/N instead")
    index = int(match.group(1))
    if index >= count:
        return None, (f"the host name {hostname[:64]!r} gives ordinal {index}, "
                      f"not below MQTT_SHARDS={count}")
    return Shard(index, count), None
