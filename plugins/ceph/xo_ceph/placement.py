"""Where an S3 object's head lives: its RADOS name, its placement group, and
the OSD acting as that PG's primary, per osdmap epoch.

- RGW names the head of object KEY in bucket B ``<B's marker>_<KEY>`` in the
  data pool of B's placement target; a key starting with ``_`` is escaped to
  ``<marker>__<KEY>`` and gets the locator ``KEY`` (the PG is hashed from the
  locator then). Multipart heads are empty; tails (``__shadow_``,
  ``__multipart_``) are other objects, usually on other OSDs.
- The PG is computed here, as librados does it: rjenkins hash of the locator
  (or the name), folded onto ``pg_num`` with Ceph's stable modulo.
- PG -> acting set comes from the monitor (``pg map``), cached until the
  osdmap epoch changes. The osdmap is polled (``osd dump``) so OSDs going down,
  out, or new are followed without a restart.
"""

from __future__ import annotations

import json
import logging
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("xo.ceph.placement")

MASK = 0xFFFFFFFF


# lookup2's mix: three rounds, each subtracting the other two words from a,
# b, c in turn and folding in a shifted word (right, left, right) by these
_MIX_SHIFTS = ((13, 8, 13), (12, 16, 5), (3, 10, 15))


def _mix(a: int, b: int, c: int) -> tuple[int, int, int]:
    for right_a, left_b, right_c in _MIX_SHIFTS:
        a = ((a - b - c) & MASK) ^ (c >> right_a)
        b = ((b - c - a) & MASK) ^ ((a << left_b) & MASK)
        c = ((c - a - b) & MASK) ^ (b >> right_c)
    return a, b, c


def _add_block(a: int, b: int, c: int, block: bytes) -> tuple[int, int, int]:
    """Add a 12-byte block to (a, b, c) as three little-endian words."""
    return ((a + int.from_bytes(block[0:4], "little")) & MASK,
            (b + int.from_bytes(block[4:8], "little")) & MASK,
            (c + int.from_bytes(block[8:12], "little")) & MASK)


def str_hash_rjenkins(data: bytes) -> int:
    """Ceph's CEPH_STR_HASH_RJENKINS (Bob Jenkins' lookup2), the default
    object hash of every pool."""
    a = b = 0x9E3779B9
    c = 0
    whole = len(data) - len(data) % 12
    for pos in range(0, whole, 12):
        a, b, c = _mix(*_add_block(a, b, c, data[pos:pos + 12]))
    # the last 0-11 bytes, zero-padded; c's lowest byte is the length's
    tail = data[whole:].ljust(11, b"\0")
    a, b, c = _add_block(a, b, (c + len(data)) & MASK, tail[:8] + b"\0" + tail[8:])
    return _mix(a, b, c)[2]


def stable_mod(x: int, b: int, bmask: int) -> int:
    return x & bmask if (x & bmask) < b else x & (bmask >> 1)


def pg_mask(pg_num: int) -> int:
    return (1 << (pg_num - 1).bit_length()) - 1


def pg_of(name: str, locator: str, nspace: str, pg_num: int) -> int:
    """The PG seed of an object (pg_pool_t::hash_key + raw_pg_to_pg)."""
    key = (locator or name).encode()
    if nspace:
        key = nspace.encode() + b"\x1f" + key
    return stable_mod(str_hash_rjenkins(key), pg_num, pg_mask(pg_num))


def head_object(marker: str, key: str) -> tuple[str, str]:
    """(RADOS name, locator) of an object's head (rgw_obj_key::get_oid/get_loc)."""
    if key.startswith("_"):
        return f"{marker}__{key}", f"{marker}_{key}"
    return f"{marker}_{key}", ""


@dataclass
class OsdInfo:
    id: int
    up: bool
    in_: bool
    ip: str       # public msgr2 address
    port: int


@dataclass
class PoolInfo:
    id: int
    name: str
    pg_num: int


@dataclass
class OsdMap:
    epoch: int
    osds: dict[int, OsdInfo]
    pools: dict[str, PoolInfo]

    @classmethod
    def from_dump(cls, dump: dict[str, Any]) -> OsdMap:
        osds = {}
        for o in dump.get("osds", []):
            ip, port = "", 0
            for addr in o.get("public_addrs", {}).get("addrvec", []):
                if addr.get("type") == "v2":
                    host, _, p = addr["addr"].rpartition(":")
                    ip, port = host.strip("[]"), int(p)
            osds[int(o["osd"])] = OsdInfo(int(o["osd"]), bool(o["up"]), bool(o["in"]), ip, port)
        pools = {p["pool_name"]: PoolInfo(int(p["pool"]), p["pool_name"], int(p["pg_num"]))
                 for p in dump.get("pools", [])}
        return cls(int(dump["epoch"]), osds, pools)


@dataclass
class Bucket:
    name: str
    marker: str
    data_pool: str


Command = Callable[..., Any]


@dataclass
class Placement:
    """The front's view of the cluster: the osdmap (polled), bucket markers and
    data pools (cached), PG primaries per epoch (cached)."""

    command: Command                # mon command: command(prefix, **args) -> JSON
    radosgw_admin: Callable[..., str]
    osdmap: OsdMap | None = None
    _buckets: dict[str, Bucket] = field(default_factory=dict)
    _zone_pools: dict[str, str] = field(default_factory=dict)
    _primaries: dict[tuple[int, int], int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    lookups: int = 0   # pg map commands sent

    def refresh(self) -> bool:
        """Read the osdmap; True when its epoch changed (caches dropped)."""
        new = OsdMap.from_dump(self.command("osd dump"))
        with self._lock:
            changed = self.osdmap is None or new.epoch != self.osdmap.epoch
            if changed:
                self._primaries.clear()
            self.osdmap = new
        return changed

    def cached_bucket(self, name: str) -> Bucket | None:
        with self._lock:
            return self._buckets.get(name)

    def bucket(self, name: str) -> Bucket | None:
        with self._lock:
            got = self._buckets.get(name)
        if got is not None:
            return got
        try:
            stats = json.loads(self.radosgw_admin("bucket", "stats", f"--bucket={name}"))
        except (RuntimeError, ValueError, subprocess.SubprocessError) as exc:
            log.debug("bucket %s: %s", name, exc)
            return None
        pool = self._data_pool(stats.get("placement_rule") or "default-placement",
                               stats.get("explicit_placement", {}))
        if not pool:
            return None
        got = Bucket(name, stats["marker"], pool)
        with self._lock:
            self._buckets[name] = got
        return got

    def forget_bucket(self, name: str) -> None:
        with self._lock:
            self._buckets.pop(name, None)

    def _data_pool(self, rule: str, explicit: dict[str, str]) -> str:
        if explicit.get("data_pool"):
            return explicit["data_pool"]
        rule = rule.split("/")[0]
        if rule not in self._zone_pools:
            zone = json.loads(self.radosgw_admin("zone", "get"))
            for p in zone.get("placement_pools", []):
                classes = p["val"].get("storage_classes", {})
                self._zone_pools[p["key"]] = classes.get("STANDARD", {}).get("data_pool", "")
        return self._zone_pools.get(rule, "")

    def _lookup(self, pool: str, name: str,
                locator: str) -> tuple[OsdMap, int, int, int | None] | None:
        """(the osdmap read, pool id, pg seed, cached primary OSD id or None)
        of an object; None when there is no osdmap or no such pool."""
        osdmap = self.osdmap
        if osdmap is None or pool not in osdmap.pools:
            return None
        info = osdmap.pools[pool]
        seed = pg_of(name, locator, "", info.pg_num)
        with self._lock:
            return osdmap, info.id, seed, self._primaries.get((info.id, seed))

    def cached_primary(self, pool: str, name: str,
                       locator: str) -> tuple[int, int, int] | None:
        """As primary(), from the cache only (None on a miss): never blocks."""
        got = self._lookup(pool, name, locator)
        if got is None:
            return None
        _osdmap, pool_id, seed, osd = got
        return None if osd is None else (pool_id, seed, osd)

    def primary(self, pool: str, name: str, locator: str) -> tuple[int, int, int] | None:
        """(pool id, pg seed, acting primary OSD id) of an object, or None."""
        got = self._lookup(pool, name, locator)
        if got is None:
            return None
        osdmap, pool_id, seed, osd = got
        if osd is None:
            out = self.command("pg map", pgid=f"{pool_id}.{seed:x}")
            osd = int(out.get("acting_primary", out["acting"][0] if out.get("acting") else -1))
            self.lookups += 1
            with self._lock:
                if self.osdmap is osdmap:
                    self._primaries[(pool_id, seed)] = osd
        return pool_id, seed, osd

def poll_interval_s() -> float:
    return 0.5


def monotonic() -> float:
    return time.monotonic()
