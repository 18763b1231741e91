"""XO for Ceph end to end: a real cluster on a lab (mon, mgr, front radosgw on
the host; one memstore OSD, its radosgw and its XO agent on each of three
target hosts), boto3 in the client namespace talking to the XO front.

Checked against the cluster itself: bodies by hash; offloaded GETs served by
the agent of the head's acting primary (the mon's `osd map` says which; the
agents' logs say who served); S3 errors and conditional/range answers equal
to the stock radosgw's; a keep-alive session moving between OSD hosts with no
client retransmission or reset (the client namespace's kernel counters); an
OSD marked out and an agent killed while requests run; nothing left behind
(the fixture's teardown).

The same cluster's front also serves HTTPS (a certificate from a test CA):
boto3 over TLS, handed off with the session's record state to the agents,
which continue it with the core's record layer; an agent that takes no TLS
makes the front roll back and serve."""

from __future__ import annotations

import hashlib
import io
import json
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import cycle, islice
from pathlib import Path
from typing import Any

import pytest
from boto3.s3.transfer import TransferConfig
from botocore.exceptions import ClientError
from ceph_tools import LabCluster, front_stats, interface_bytes, lab_cluster, rand, served_lines
from netns_tools import client_loss_counters, snmp_tcp, wait_for
from xo.ceph import cluster, service
from xo.ceph.placement import head_object
from xo.lab import in_netns

THRESHOLD = 1 << 20
SIZES = {"4k": 4096, "1m": 1 << 20, "4m+1": (4 << 20) + 1, "16m": 16 << 20, "64m": 64 << 20}
KEY_STYLES = ["plain-{}", "dir/sub/{}", "with space {}", "ütf8-ключ-{}", "_lead-{}"]
BUCKETS = {"xo-repl": None, "xo-ec": ":ec-placement"}


@pytest.fixture(scope="module")
def lc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabCluster]:
    name = "c" + secrets.token_hex(3)
    with lab_cluster(name, tmp_path_factory.mktemp("ceph") / "w", threshold=THRESHOLD,
                     tls=True) as lc:
        with in_netns(lc.client_ns):
            s3 = lc.client()
            for bucket, placement in BUCKETS.items():
                kw: dict[str, Any] = {}
                if placement:
                    kw["CreateBucketConfiguration"] = {"LocationConstraint": placement}
                s3.create_bucket(Bucket=bucket, **kw)
        try:
            yield lc
        finally:
            mon = _MONS.pop(lc.state.fsid, None)
            if mon is not None:
                mon.close()


_MARKERS: dict[tuple[str, str], str] = {}
_MONS: dict[str, cluster.Mon] = {}


def mon_of(lc: LabCluster) -> cluster.Mon:
    mon = _MONS.get(lc.state.fsid)
    if mon is None:
        mon = _MONS[lc.state.fsid] = cluster.Mon(lc.state)
    return mon


def acting_primary(lc: LabCluster, bucket: str, key: str) -> int:
    """What the monitor says: the acting primary of the object's head PG
    (`osd map` on the locator when the key has one: the PG hashes it)."""
    pool = cluster.EC_DATA_POOL if BUCKETS[bucket] else cluster.DATA_POOL
    marker = _MARKERS.get((lc.state.fsid, bucket))
    if marker is None:
        stats = cluster.ceph_cmd(lc.state, "bucket", "stats", f"--bucket={bucket}",
                                 tool="radosgw-admin").stdout
        marker = _MARKERS[(lc.state.fsid, bucket)] = json.loads(stats)["marker"]
    oid, locator = head_object(marker, key)
    out = mon_of(lc).command("osd map", pool=pool, object=locator or oid)
    return int(out["acting_primary"])


def served_counts(lc: LabCluster) -> dict[int, int]:
    return {i: len(served_lines(lc.state, i)) for i in range(len(lc.state.osds))}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def put(s3: Any, bucket: str, key: str, body: bytes, multipart: bool) -> None:
    if multipart:
        cfg = TransferConfig(multipart_threshold=8 << 20, multipart_chunksize=8 << 20,
                             use_threads=False)
        s3.upload_fileobj(io.BytesIO(body), bucket, key, Config=cfg)
    else:
        s3.put_object(Bucket=bucket, Key=key, Body=body)


def test_put_get_sizes_keys_pools_offloaded_to_primary(lc: LabCluster) -> None:
    host = lc.testbed.host
    objects = []
    for bucket in BUCKETS:
        for n, (label, size) in enumerate(SIZES.items()):
            objects.append((bucket, KEY_STYLES[n % len(KEY_STYLES)].format(label), size, False))
            if size >= 16 << 20:
                objects.append((bucket, f"mp/{label}", size, True))
    with in_netns(lc.client_ns):
        s3 = lc.client()
        digests = {}
        for bucket, key, size, multipart in objects:
            body = rand(size)
            digests[(bucket, key)] = sha(body)
            put(s3, bucket, key, body, multipart)
        for bucket, key, size, _multipart in objects:
            primary = acting_primary(lc, bucket, key)
            before = served_counts(lc)
            tx0 = interface_bytes(host.netns, host.ifname)["tx"]
            got = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
            tx = interface_bytes(host.netns, host.ifname)["tx"] - tx0
            assert len(got) == size and sha(got) == digests[(bucket, key)], (bucket, key)
            after = served_counts(lc)
            delta = {i: after[i] - before[i] for i in after}
            if size >= THRESHOLD:
                # answered by the agent beside the head's acting primary only
                assert delta == {i: int(i == primary) for i in delta}, (bucket, key, primary,
                                                                         delta)
                assert tx < size // 4, (bucket, key, tx)  # the body did not leave the front
            else:
                assert not any(delta.values()), (bucket, key, delta)
                assert tx >= size
    st = front_stats(lc.state)
    assert st["offloaded"] == sum(1 for *_x, size, _m in objects if size >= THRESHOLD)
    assert st["engine"]["rollbacks"] == 0


def test_range_and_conditional_gets_as_stock(lc: LabCluster) -> None:
    body = rand(16 << 20)
    with in_netns(lc.client_ns):
        front, stock = lc.client(), lc.stock()
        front.put_object(Bucket="xo-repl", Key="cond/obj", Body=body)
        etag = front.head_object(Bucket="xo-repl", Key="cond/obj")["ETag"]
        before = front_stats(lc.state)["offloaded"]
        for rng in ("bytes=0-0", "bytes=1000-1999", "bytes=-4097", f"bytes={(16 << 20) - 5}-"):
            answers = [c.get_object(Bucket="xo-repl", Key="cond/obj", Range=rng)
                       for c in (front, stock)]
            bodies = [a["Body"].read() for a in answers]
            first, last = rng[6:].split("-")
            start = len(body) - int(last) if not first else int(first)
            end = len(body) if not last or not first else int(last) + 1
            assert bodies[0] == bodies[1] == body[start:end], rng
            for field in ("ContentRange", "ContentLength", "ETag"):
                assert answers[0][field] == answers[1][field], (rng, field)
            assert (answers[0]["ResponseMetadata"]["HTTPStatusCode"]
                    == answers[1]["ResponseMetadata"]["HTTPStatusCode"] == 206)
        got = front.get_object(Bucket="xo-repl", Key="cond/obj", IfMatch=etag)["Body"].read()
        assert sha(got) == sha(body)
        for kw, status in (({"IfNoneMatch": etag}, 304), ({"IfMatch": '"nope"'}, 412),
                           ({"IfModifiedSince": "2100-01-01T00:00:00Z"}, 304)):
            codes = []
            for c in (front, stock):
                with pytest.raises(ClientError) as err:
                    c.get_object(Bucket="xo-repl", Key="cond/obj", **kw)
                codes.append((err.value.response["ResponseMetadata"]["HTTPStatusCode"],
                              err.value.response["Error"]["Code"]))
            assert codes[0] == codes[1] and codes[0][0] == status, (kw, codes)
    # ranges and conditionals of a large object went to its primary's agent too
    assert front_stats(lc.state)["offloaded"] - before >= 8


def _error(call: Any) -> tuple[int, str]:
    with pytest.raises(ClientError) as err:
        call()
    return (err.value.response["ResponseMetadata"]["HTTPStatusCode"],
            err.value.response["Error"]["Code"])


def test_errors_exactly_as_stock(lc: LabCluster) -> None:
    with in_netns(lc.client_ns):
        lc.client().put_object(Bucket="xo-repl", Key="private/big", Body=rand(2 << 20))
        lc.client().put_object(Bucket="xo-repl", Key="private/small", Body=rand(100))
        before = front_stats(lc.state)["offloaded"]
        for key in ("private/big", "private/small"):
            results = []
            for make in (lc.client, lc.stock):
                wrong = make("xo", secret="wrong" + lc.state.users["xo"].secret_key[5:])
                anon, other, owner = make(None), make("xo2"), make()
                results.append((
                    _error(lambda w=wrong, k=key: w.get_object(Bucket="xo-repl", Key=k)),
                    _error(lambda o=owner, k=key: o.get_object(Bucket="xo-repl",
                                                               Key=k + "-none")),
                    _error(lambda a=anon, k=key: a.get_object(Bucket="xo-repl", Key=k)),
                    _error(lambda o=other, k=key: o.get_object(Bucket="xo-repl", Key=k)),
                ))
            assert results[0] == results[1], (key, results)
            assert [r[0] for r in results[0]] == [403, 404, 403, 403]
            assert results[0][0][1] == "SignatureDoesNotMatch"
            assert results[0][1][1] == "NoSuchKey"
            assert results[0][2][1] == "AccessDenied"
    # the big private object's denied GETs were answered by an agent's radosgw
    assert front_stats(lc.state)["offloaded"] - before == 3


def _upload_spread(lc: LabCluster, s3: Any, count: int, size: int,
                   prefix: str) -> dict[str, tuple[str, int]]:
    objects = {}
    for i in range(count):
        key = f"{prefix}/{i:03d}"
        body = rand(size)
        s3.put_object(Bucket="xo-repl", Key=key, Body=body)
        objects[key] = (sha(body), acting_primary(lc, "xo-repl", key))
    return objects


@dataclass
class Session:
    """What GETs on one keep-alive client connection did (deltas over the run)."""

    loss: dict[str, int]      # the client namespace's loss counters
    opens: int                # TCP connections the client opened
    st0: dict[str, Any]       # the front's counters before
    st: dict[str, Any]        # and after
    served: dict[int, int]    # GETs each agent served

    def grew(self, *path: str) -> int:
        """How much the front counter at path (e.g. "tls", "offloaded") grew."""
        now, then = self.st, self.st0
        for name in path:
            now, then = now[name], then[name]
        return int(now) - int(then)


def _session_gets(lc: LabCluster, s3: Any, objects: dict[str, tuple[str, int]],
                  keys: list[str], served_of: Callable[[LabCluster], dict[int, int]],
                  between: Callable[[int], None] | None = None) -> Session:
    """GET keys in turn on s3's connection (opened first, before counting),
    each body checked by hash; between(i) after the i-th GET. Run it in the
    client namespace; served_of counts the GETs each agent served."""
    s3.head_bucket(Bucket="xo-repl")  # the connection is open before counting
    loss0 = client_loss_counters(lc.client_ns)
    opens0 = snmp_tcp(lc.client_ns)["ActiveOpens"]
    st0 = front_stats(lc.state)
    served0 = served_of(lc)
    for i, key in enumerate(keys):
        got = s3.get_object(Bucket="xo-repl", Key=key)["Body"].read()
        assert sha(got) == objects[key][0], (i, key)
        if between is not None:
            between(i)
    loss = {k: v - loss0[k] for k, v in client_loss_counters(lc.client_ns).items()}
    opens = snmp_tcp(lc.client_ns)["ActiveOpens"] - opens0
    served = {i: n - served0[i] for i, n in served_of(lc).items()}
    return Session(loss, opens, st0, front_stats(lc.state), served)


def _by_primary(primaries: Iterable[int]) -> dict[int, int]:
    """How many of the given head primaries each OSD is."""
    return dict(Counter(primaries))


def test_keepalive_session_moves_between_osd_hosts_losslessly(lc: LabCluster) -> None:
    with in_netns(lc.client_ns):
        objects = _upload_spread(lc, lc.client(), 24, THRESHOLD + 4096, "ka")
        assert len({p for _d, p in objects.values()}) >= 2
        keys = list(islice(cycle(objects), 200))
        run = _session_gets(lc, lc.client(pool=1), objects, keys, served_counts)
    assert run.opens == 0, "one keep-alive connection for the whole session"
    assert run.grew("offloaded") == 200
    assert run.grew("returned") >= 199
    assert {i: n for i, n in run.served.items() if n} == _by_primary(objects[k][1] for k in keys)
    assert run.loss == {k: 0 for k in run.loss}, run.loss


# ---- HTTPS through the front ---------------------------------------------------------


def tls_served_counts(lc: LabCluster) -> dict[int, int]:
    """GETs each agent answered over a TLS session (the core's record layer)."""
    return {i: sum(1 for line in served_lines(lc.state, i) if line.endswith(" tls=record"))
            for i in range(len(lc.state.osds))}


def _curl(lc: LabCluster, url: str, version: str, out: Path) -> str:
    """GET url with curl in the client namespace at exactly TLS version
    ("1.2" or "1.3"), verifying against the test CA; the status code."""
    assert lc.ca is not None
    res = subprocess.run(["ip", "netns", "exec", lc.client_ns, "curl", "-sS", "--cacert",
                          str(lc.ca), f"--tlsv{version}", "--tls-max", version, "-o", str(out),
                          "-w", "%{http_code}", url], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stderr
    return res.stdout


def test_https_put_get_offloaded_with_tls_state(lc: LabCluster, tmp_path: Path) -> None:
    objects = {f"tls/{label}": size for label, size in
               (("4k", 4096), ("1m", 1 << 20), ("16m", 16 << 20))}
    st0 = front_stats(lc.state)
    with in_netns(lc.client_ns):
        s3 = lc.tls_client()
        digests = {}
        for key, size in objects.items():
            body = rand(size)
            digests[key] = (sha(body), body)
            s3.put_object(Bucket="xo-repl", Key=key, Body=body)
        host = lc.testbed.host
        for key, size in objects.items():
            primary = acting_primary(lc, "xo-repl", key)
            before = tls_served_counts(lc)
            tx0 = interface_bytes(host.netns, host.ifname)["tx"]
            got = s3.get_object(Bucket="xo-repl", Key=key)["Body"].read()
            tx = interface_bytes(host.netns, host.ifname)["tx"] - tx0
            assert len(got) == size and sha(got) == digests[key][0], key
            delta = {i: n - before[i] for i, n in tls_served_counts(lc).items()}
            if size >= THRESHOLD:  # the session went to the head primary's agent
                assert delta == {i: int(i == primary) for i in delta}, (key, primary, delta)
                assert tx < size // 4, (key, tx)  # the records left from the OSD host
            else:
                assert not any(delta.values()), (key, delta)
                assert tx >= size
        big = digests["tls/16m"][1]
        for rng in ("bytes=1000-1999", "bytes=-4097"):
            answer = s3.get_object(Bucket="xo-repl", Key="tls/16m", Range=rng)
            first, last = rng[6:].split("-")
            want = big[-int(last):] if not first else big[int(first):int(last) + 1]
            assert answer["Body"].read() == want, rng
            assert answer["ResponseMetadata"]["HTTPStatusCode"] == 206
        url = s3.generate_presigned_url("get_object", Params={"Bucket": "xo-repl",
                                                              "Key": "tls/1m"}, ExpiresIn=600)
    # curl with each TLS version on its own, presigned: handed off too
    for version in ("1.2", "1.3"):
        out = tmp_path / f"curl-{version}"
        assert _curl(lc, url, version, out) == "200"
        assert sha(out.read_bytes()) == digests["tls/1m"][0], version
    st = front_stats(lc.state)
    # 1m, 16m, two ranges of 16m, two curl GETs: all with their TLS state
    assert st["tls"]["offloaded"] - st0["tls"]["offloaded"] == 6
    # boto3's keep back; curl closes as soon as it has its body, perhaps
    # before its connection was handed back
    assert st["tls"]["returned"] - st0["tls"]["returned"] >= 4
    assert st["tls"]["failed"] == st0["tls"]["failed"]
    versions = {v: n - st0["tls"]["versions"].get(v, 0) for v, n in st["tls"]["versions"].items()}
    assert versions.get("TLSv1.2") == 1 and versions.get("TLSv1.3", 0) >= 2, versions
    assert st["engine"]["rollbacks"] == st0["engine"]["rollbacks"]


def test_https_errors_exactly_as_plain(lc: LabCluster) -> None:
    with in_netns(lc.client_ns):
        lc.client().put_object(Bucket="xo-repl", Key="tls-private/big", Body=rand(2 << 20))
        before = front_stats(lc.state)
        results = []
        for make in (lc.tls_client, lc.client):
            wrong = make("xo", secret="wrong" + lc.state.users["xo"].secret_key[5:])
            owner = make()
            results.append((
                _error(lambda w=wrong: w.get_object(Bucket="xo-repl", Key="tls-private/big")),
                _error(lambda o=owner: o.get_object(Bucket="xo-repl", Key="tls-private/none")),
            ))
    assert results[0] == results[1] == ((403, "SignatureDoesNotMatch"), (404, "NoSuchKey")), \
        results
    st = front_stats(lc.state)
    # the wrong-secret GET of the big object was answered by an agent's radosgw,
    # over TLS once and plain once; the missing key through the front's radosgw
    assert st["offloaded"] - before["offloaded"] == 2
    assert st["tls"]["offloaded"] - before["tls"]["offloaded"] == 1


def test_https_keepalive_session_one_handshake_lossless(
        lc: LabCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    keylog = tmp_path / "client-keys.log"
    monkeypatch.setenv("SSLKEYLOGFILE", str(keylog))  # botocore's client logs its secrets
    small = rand(4096)
    with in_netns(lc.client_ns):
        objects = _upload_spread(lc, lc.client(), 10, THRESHOLD + 4096, "tls-ka")
        assert len({p for _d, p in objects.values()}) >= 2
        lc.client().put_object(Bucket="xo-repl", Key="tls-ka/small", Body=small)
        s3 = lc.tls_client(pool=1)

        def small_get(i: int) -> None:
            if i % 5 == 4:
                # a small GET in between: served by the front through the
                # session the agent handed back (the core's record layer there)
                got = s3.get_object(Bucket="xo-repl", Key="tls-ka/small")["Body"].read()
                assert got == small, i

        keys = list(islice(cycle(objects), 30))
        run = _session_gets(lc, s3, objects, keys, tls_served_counts, small_get)
    assert run.opens == 0, "one keep-alive connection for the whole session"
    # one TLS handshake: the front accepted none during the session, and the
    # client's key log holds one ClientHello random
    assert run.grew("tls", "handshakes") == 0
    randoms = {line.split()[1] for line in keylog.read_text().splitlines()
               if line and not line.startswith("#")}
    assert len(randoms) == 1, randoms
    assert run.grew("tls", "offloaded") == 30
    assert run.grew("tls", "returned") >= 29
    assert run.grew("proxied") == 6
    assert {i: n for i, n in run.served.items() if n} == _by_primary(objects[k][1] for k in keys)
    assert run.loss == {k: 0 for k in run.loss}, run.loss


def _get_loop(lc: LabCluster, objects: dict[str, tuple[str, int]], rounds: int,
              results: list[Any], started: threading.Event) -> None:
    try:
        with in_netns(lc.client_ns):
            s3 = lc.client(pool=1, retries=3)
            keys = list(objects)
            for i in range(rounds):
                key = keys[i % len(keys)]
                got = s3.get_object(Bucket="xo-repl", Key=key)["Body"].read()
                results.append(sha(got) == objects[key][0])
                if i == 5:
                    started.set()
    except Exception as exc:  # noqa: BLE001 - reported by the test
        results.append(exc)
    finally:
        started.set()


def test_osd_marked_out_mid_run_followed(lc: LabCluster) -> None:
    with in_netns(lc.client_ns):
        objects = _upload_spread(lc, lc.client(), 12, THRESHOLD + 1, "out")
    victim = max({p for _d, p in objects.values()},
                 key=lambda p: sum(1 for _d, q in objects.values() if q == p))
    results: list[Any] = []
    started = threading.Event()
    worker = threading.Thread(target=_get_loop, args=(lc, objects, 80, results, started))
    worker.start()
    started.wait(60)
    mon = mon_of(lc)
    try:
        epoch0 = mon.command("osd dump")["epoch"]
        mon.command("osd out", ids=[str(victim)])
        wait_for(lambda: front_stats(lc.state, settled=False)["epoch"] > epoch0,
                 "the front to see the map", timeout=20)
        worker.join(120)
        assert not worker.is_alive(), "requests hung"
        assert results and all(r is True for r in results), results
        # after the change, the head primaries moved off the victim: GETs follow
        new = {k: (d, acting_primary(lc, "xo-repl", k)) for k, (d, _p) in objects.items()}
        assert all(p != victim for _d, p in new.values())
        before = served_counts(lc)
        with in_netns(lc.client_ns):
            s3 = lc.client()
            for key, (digest, _p) in new.items():
                assert sha(s3.get_object(Bucket="xo-repl", Key=key)["Body"].read()) == digest
        delta = {i: n - before[i] for i, n in served_counts(lc).items()}
        assert delta[victim] == 0
        assert {i: n for i, n in delta.items() if n} == _by_primary(p for _d, p in new.values())
    finally:
        mon.command("osd in", ids=[str(victim)])


def test_agent_killed_mid_run_falls_back(lc: LabCluster) -> None:
    with in_netns(lc.client_ns):
        objects = _upload_spread(lc, lc.client(), 12, THRESHOLD + 1, "kill")
    victim = max({p for _d, p in objects.values()},
                 key=lambda p: sum(1 for _d, q in objects.values() if q == p))
    proc = lc.state.proc(f"agent.{victim}")
    assert proc is not None and proc.alive()
    results: list[Any] = []
    started = threading.Event()
    worker = threading.Thread(target=_get_loop, args=(lc, objects, 60, results, started))
    worker.start()
    started.wait(60)
    proc.signal(signal.SIGKILL)
    wait_for(lambda: not front_stats(lc.state, settled=False)["agents"].get(f"osd.{victim}",
                                                                            True),
             "the front to notice the agent is gone", timeout=30)
    worker.join(120)
    assert not worker.is_alive(), "requests hung"
    assert results and all(r is True for r in results), results
    before = served_counts(lc)
    st0 = front_stats(lc.state)
    with in_netns(lc.client_ns):
        s3 = lc.client()
        for key, (digest, _p) in objects.items():
            assert sha(s3.get_object(Bucket="xo-repl", Key=key)["Body"].read()) == digest
    st = front_stats(lc.state)
    on_victim = sum(1 for _d, p in objects.values() if p == victim)
    assert served_counts(lc)[victim] == before[victim]
    # objects on the victim's PGs were served through the front's radosgw
    assert st["proxied"] - st0["proxied"] >= on_victim


def test_https_agent_without_tls_rolls_back(lc: LabCluster) -> None:
    """An agent that takes no TLS (--no-tls): the front's handoff of a TLS
    session to it rolls back and the front serves the GET over the same
    session; the other agents still take theirs. No reset, no resend."""
    live = [i for i in range(len(lc.state.osds))
            if (p := lc.state.proc(f"agent.{i}")) is not None and p.alive()]
    with in_netns(lc.client_ns):
        objects = _upload_spread(lc, lc.client(), 12, THRESHOLD + 1, "tls-no")
    victim = max(live, key=lambda o: sum(1 for _d, p in objects.values() if p == o))
    on_victim = sum(1 for _d, p in objects.values() if p == victim)
    assert on_victim, "no object on a live agent's OSD"
    old = lc.state.proc(f"agent.{victim}")
    assert old is not None
    argv = old.argv[old.argv.index(sys.executable):] if sys.executable in old.argv else None
    assert argv is not None and "--osd" in argv, old.argv
    old.signal(signal.SIGTERM)
    wait_for(lambda: not old.alive(), "the agent to stop", timeout=20)
    lc.state.procs.remove(old)
    new = cluster._spawn(lc.state, f"agent.{victim}", [*argv, "--no-tls"], old.netns)
    service.wait_ready(new)
    wait_for(lambda: front_stats(lc.state, settled=False)["agents"].get(f"osd.{victim}"),
             "the front to reconnect to the agent", timeout=30)
    with in_netns(lc.client_ns):
        run = _session_gets(lc, lc.tls_client(pool=1), objects, list(objects), served_counts)
    assert run.served[victim] == 0
    assert run.grew("offload_failed") == on_victim
    assert run.grew("engine", "rollbacks") == on_victim
    on_others = sum(1 for _d, p in objects.values() if p in live and p != victim)
    assert run.grew("tls", "offloaded") == on_others
    assert run.opens == 0
    assert run.loss == {k: 0 for k in run.loss}, run.loss
    assert "takes no TLS sessions" in lc.state.log("front").read_text(errors="replace")


def test_cluster_dir_has_config_and_logs(lc: LabCluster) -> None:
    path = Path(lc.state.workdir)
    assert (path / "xo-ceph.toml").exists()
    assert (path / "xo-cluster.key").stat().st_mode & 0o077 == 0
    assert time.time() - lc.state.started_at < 3600
