"""The front's placement arithmetic (rjenkins object hash, stable modulo onto
pg_num) against Ceph's own: `osdmaptool --test-map-object` on a generated
osdmap, no daemon. Names of every length up to three 12-byte blocks and past
them, so every tail length of the hash is met, on power-of-two and other pg_num
values (the stable modulo's two branches)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from xo.ceph.placement import head_object, pg_of

NAMES = ["".join(chr(33 + (i * 37 + n) % 94) for i in range(n)) for n in range(1, 41)]
NAMES += ["ütf8-ключ-7", "with space 3", "_lead-1", "marker.123__lead-1"]


def _osdmap(path: Path, osds: int, pg_bits: int) -> int:
    """An osdmap with one rjenkins pool (id 1) of osds << pg_bits PGs; its pg_num."""
    subprocess.run(["osdmaptool", "--createsimple", str(osds), str(path), "--with-default-pool",
                    "--pg-bits", str(pg_bits), "--clobber"], check=True,
                   capture_output=True, timeout=60)
    out = subprocess.run(["osdmaptool", str(path), "--print"], check=True,
                         capture_output=True, text=True, timeout=60).stdout
    found = re.search(r"^pool 1 .* object_hash rjenkins pg_num (\d+) ", out, re.M)
    assert found, out
    return int(found.group(1))


def _ceph_pg(path: Path, name: str) -> int:
    out = subprocess.run(["osdmaptool", str(path), "--test-map-object", name, "--pool", "1"],
                         check=True, capture_output=True, text=True, timeout=60).stdout
    found = re.search(r"-> 1\.([0-9a-f]+) ->", out)
    assert found, out
    return int(found.group(1), 16)


@pytest.mark.parametrize(("osds", "pg_bits"), [(3, 6), (4, 6), (3, 10)])
def test_pg_of_equals_ceph(tmp_path: Path, osds: int, pg_bits: int) -> None:
    path = tmp_path / "osdmap"
    pg_num = _osdmap(path, osds, pg_bits)
    assert pg_num == osds << pg_bits
    for name in NAMES:
        assert pg_of(name, "", "", pg_num) == _ceph_pg(path, name), (name, pg_num)


def test_head_object_locator_decides_the_pg() -> None:
    assert head_object("m.1", "key") == ("m.1_key", "")
    assert head_object("m.1", "_key") == ("m.1___key", "m.1__key")
    oid, locator = head_object("m.1", "_key")
    assert pg_of(oid, locator, "", 192) == pg_of(locator, "", "", 192) != pg_of(oid, "", "", 192)
