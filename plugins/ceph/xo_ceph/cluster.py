"""``xo ceph vstart|stop|status``: a real Ceph cluster from Debian's packages in
a working directory: 1 mon, 1 mgr, N OSDs (memstore by default, bluestore on a
file optional), radosgw instances and S3 users.

Two layouts:

- ``loopback``: everything in the current network namespace on 127.0.0.1
  (a stock cluster for development; no handoffs).
- ``lab``: on an existing ``xo lab`` (``xo lab up --targets N``): mon, mgr and
  the front's radosgw in the lab's host namespace, one OSD and its radosgw in
  each target namespace, so every target host owns an OSD. With ``xo=True``
  the XO front (host role) and one agent per OSD (target role) start too.

Everything started is recorded in ``<workdir>/cluster.json`` with PID and
kernel start time; ``stop`` signals exactly those processes (SIGTERM, then
SIGKILL after a bound), and removes the pinned steering maps of the agents
and the front. Every wait is bounded and fails with the daemon's log named.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from xo.ceph.procs import Proc, exit_status, netns_argv, spawn, stop_all

STATE_FILE = "cluster.json"
CONF_FILE = "ceph.conf"
MON_PORT = 3300          # msgr2
RGW_PORT = 7480          # every radosgw, on its host
FRONT_PORT = 8080        # the XO front, on the lab's host address
FRONT_TLS_PORT = 8443    # its HTTPS listener (vstart with a certificate and key)
ZONE = "default"
DATA_POOL = "default.rgw.buckets.data"
EC_DATA_POOL = "default.rgw.buckets.data.ec"
EC_PLACEMENT = "ec-placement"
EC_PROFILE = "xo-k2m1"
RGW_POOLS = [".rgw.root", "default.rgw.control", "default.rgw.meta", "default.rgw.log",
             "default.rgw.buckets.index", "default.rgw.buckets.non-ec"]
USERS = {"xo": "XO test user", "xo2": "XO second user"}
START_TIMEOUT = 60.0
CEPH_TIMEOUT = 20.0


class CephError(RuntimeError):
    """A cluster step failed; the message says which and where to look."""


@dataclass
class Member:
    """Where one part of the cluster runs."""

    name: str      # "mon.a", "osd.0", "rgw.front", ...
    netns: str     # "" for the current namespace
    ip: str


@dataclass
class S3User:
    uid: str
    access_key: str
    secret_key: str


@dataclass
class ClusterState:
    workdir: str
    fsid: str
    layout: str                    # loopback | lab
    lab: str = ""                  # lab name (layout lab)
    objectstore: str = "memstore"
    mon: Member | None = None
    osds: list[Member] = field(default_factory=list)
    rgws: list[Member] = field(default_factory=list)   # rgws[0]: the front's radosgw
    users: dict[str, S3User] = field(default_factory=dict)
    procs: list[Proc] = field(default_factory=list)
    xo: bool = False
    front_port: int = FRONT_PORT
    started_at: float = 0.0
    pin_dirs: list[str] = field(default_factory=list)
    threshold: int = 1 << 20       # the front's offload threshold
    tls_cert: str = ""             # the front's HTTPS certificate chain and key (PEM)
    tls_key: str = ""
    front_tls_port: int = FRONT_TLS_PORT

    # ---- files
    @property
    def path(self) -> Path:
        return Path(self.workdir)

    @property
    def conf(self) -> Path:
        return self.path / CONF_FILE

    def save(self) -> None:
        data = asdict(self)
        tmp = self.path / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(data, indent=2))
        tmp.replace(self.path / STATE_FILE)

    @classmethod
    def load(cls, workdir: str | Path) -> ClusterState:
        path = Path(workdir) / STATE_FILE
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError as exc:
            raise CephError(f"no cluster in {workdir} ({path} missing)") from exc
        data["mon"] = Member(**data["mon"]) if data.get("mon") else None
        data["osds"] = [Member(**m) for m in data["osds"]]
        data["rgws"] = [Member(**m) for m in data["rgws"]]
        data["users"] = {k: S3User(**u) for k, u in data["users"].items()}
        data["procs"] = [Proc.from_dict(p) for p in data["procs"]]
        return cls(**data)

    # ---- addresses
    @property
    def mon_addr(self) -> str:
        assert self.mon is not None
        return f"v2:{self.mon.ip}:{MON_PORT}"

    def rgw_endpoint(self, index: int = 0) -> str:
        rgw = self.rgws[index]
        return f"http://{rgw.ip}:{RGW_PORT + (index if self.layout == 'loopback' else 0)}"

    @property
    def front_endpoint(self) -> str:
        return f"http://{self.rgws[0].ip}:{self.front_port}"

    @property
    def front_tls_endpoint(self) -> str | None:
        if not self.tls_cert:
            return None
        return f"https://{self.rgws[0].ip}:{self.front_tls_port}"

    def log(self, name: str) -> Path:
        return self.path / "log" / f"{name}.log"

    def proc(self, name: str) -> Proc | None:
        return next((p for p in self.procs if p.name == name), None)


# ---- running ceph tools ---------------------------------------------------------------


def ceph_cmd(state: ClusterState, *args: str, netns: str | None = None,
             timeout: float = CEPH_TIMEOUT, tool: str = "ceph",
             check: bool = True) -> subprocess.CompletedProcess[str]:
    """A ceph CLI tool against this cluster (in the mon's namespace by default)."""
    ns = state.mon.netns if netns is None and state.mon else netns
    argv = netns_argv(ns, [tool, "-c", str(state.conf), *args])
    if tool == "ceph":
        argv[len(argv) - len(args):len(argv) - len(args)] = ["--connect-timeout",
                                                            str(int(timeout))]
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout + 5)
    except subprocess.TimeoutExpired as exc:
        raise CephError(f"`{tool} {' '.join(args)}` did not answer in {timeout:.0f} s") from exc
    if check and res.returncode != 0:
        raise CephError(f"`{tool} {' '.join(args)}` failed (exit {res.returncode}): "
                        f"{(res.stderr or res.stdout).strip()[-600:]}")
    return res


def ceph_json(state: ClusterState, *args: str, **kw: Any) -> Any:
    return json.loads(ceph_cmd(state, *args, "-f", "json", **kw).stdout)


class Mon:
    """Monitor and manager commands through librados (python3-rados): one
    connection instead of a `ceph` process (~0.5 s) per command. In the lab
    layout the connection is opened from a thread inside the mon's namespace;
    librados' messenger threads inherit it."""

    def __init__(self, state: ClusterState, timeout: float = CEPH_TIMEOUT) -> None:
        import rados

        self._rados_error = rados.Error
        self.handle = rados.Rados(conffile=str(state.conf),
                                  conf={"client_mount_timeout": str(int(timeout)),
                                        "rados_mon_op_timeout": str(int(timeout)),
                                        "log_file": str(state.path / "log" / "client.log")})
        ns = state.mon.netns if state.mon else ""
        try:
            if ns:
                from xo.lab import in_netns

                with in_netns(ns):
                    self.handle.connect(timeout=int(timeout))
            else:
                self.handle.connect(timeout=int(timeout))
        except rados.Error as exc:
            raise CephError(f"cannot reach the monitor at {state.mon_addr}: {exc}") from exc

    def command(self, prefix: str, *, mgr: bool = False, check: bool = True,
                **args: Any) -> Any:
        cmd = json.dumps({"prefix": prefix, "format": "json", **args})
        try:
            if mgr:
                ret, out, err = self.handle.mgr_command(cmd, b"", timeout=int(CEPH_TIMEOUT))
            else:
                ret, out, err = self.handle.mon_command(cmd, b"", timeout=int(CEPH_TIMEOUT))
        except self._rados_error as exc:
            raise CephError(f"`{prefix}`: {exc}") from exc
        if ret != 0:
            if check:
                raise CephError(f"`{prefix} {args}` failed ({ret}): {err}")
            return None
        return json.loads(out) if out.strip() else None

    def close(self) -> None:
        self.handle.shutdown()

    def __enter__(self) -> Mon:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def wait_until(cond: Callable[[], bool], what: str, timeout: float,
               logs: Sequence[Path] = (), alive: Sequence[Proc] = ()) -> None:
    """Poll cond until true; fail clearly after timeout or when a daemon died."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if cond():
                return
        except (CephError, OSError, ValueError):
            pass
        for proc in alive:
            if not proc.alive():
                status = exit_status(proc)
                raise CephError(f"{proc.name} exited (status {status}) while waiting for "
                                f"{what}; log: {proc.log}")
        if time.monotonic() > deadline:
            where = ", ".join(str(p) for p in logs)
            raise CephError(f"timed out after {timeout:.0f} s waiting for {what}"
                            + (f"; see {where}" if where else ""))
        time.sleep(0.2)


# ---- configuration --------------------------------------------------------------------


def render_conf(state: ClusterState, memstore_bytes: int) -> str:
    w = state.path
    lines = [
        "[global]",
        f"fsid = {state.fsid}",
        f"mon host = {state.mon_addr}",
        "auth cluster required = none",
        "auth service required = none",
        "auth client required = none",
        # With auth none, the "secure" messenger modes cannot be used: radosgw
        # hangs negotiating them with the mon unless crc is asked for.
        "ms mon client mode = crc",
        "ms mon service mode = crc",
        "ms mon cluster mode = crc",
        "ms client mode = crc",
        "ms service mode = crc",
        "ms cluster mode = crc",
        "ms bind msgr1 = false",
        f"log file = {w}/log/$name.log",
        f"run dir = {w}/run",
        f"admin socket = {w}/run/$name.asok",
        f"pid file = {w}/run/$name.pid",
        # one crush host for all OSDs (their namespaces share a hostname)
        "osd crush chooseleaf type = 0",
        f"osd pool default size = {min(2, len(state.osds))}",
        # Commit map changes (pool creation, OSD state) without the default
        # one-second batching: pool creation takes ~1 s less per pool.
        "paxos propose interval = 0.05",
        "paxos min wait = 0.01",
        "osd pool default min size = 1",
        "osd pool default pg autoscale mode = off",
        "mon allow pool size one = true",
        "mon allow pool delete = true",
        "mon warn on pool no redundancy = false",
        "mon data avail warn = 1",
        "mon data avail crit = 0",
        "mon max pg per osd = 1000",
        "mon osd down out interval = 0",
        "osd heartbeat grace = 6",
        "osd heartbeat interval = 1",
        "osd objectstore = " + state.objectstore,
        f"memstore device bytes = {memstore_bytes}",
        "bluestore block create = true",
        "bluestore block size = 4294967296",
        "bluestore fsck on mount = false",
        "osd data = " + f"{w}/$name",
        "mon data = " + f"{w}/$name",
        "mgr data = " + f"{w}/$name",
        "rgw data = " + f"{w}/$name",
        "mgr initial modules = ",
        # PG states reach the mgr each second (default 5): the bring-up waits on them
        "mgr stats period = 1",
        "osd mon report interval = 1",
        "debug ms = 0",
        "",
    ]
    for i, rgw in enumerate(state.rgws):
        port = RGW_PORT + (i if state.layout == "loopback" else 0)
        bind = rgw.ip if state.layout == "loopback" else "0.0.0.0"
        lines += [
            f"[client.{rgw.name}]",
            # tcp_nodelay: else a small GET waits ~40 ms for a delayed ACK
            f"rgw frontends = beast endpoint={bind}:{port} tcp_nodelay=1",
            f"rgw zone = {ZONE}",
            "rgw enable usage log = false",
            "rgw dns name = ",
            "",
        ]
    for osd in state.osds:
        lines += [f"[{osd.name}]", f"public addr = {osd.ip}", f"cluster addr = {osd.ip}", ""]
    assert state.mon is not None
    lines += [f"[{state.mon.name}]", f"public addr = {state.mon.ip}", ""]
    return "\n".join(lines)


# ---- bring-up -------------------------------------------------------------------------


def _layout_members(state: ClusterState, osds: int, rgws: int) -> None:
    if state.layout == "loopback":
        state.mon = Member("mon.a", "", "127.0.0.1")
        state.osds = [Member(f"osd.{i}", "", "127.0.0.1") for i in range(osds)]
        state.rgws = [Member("rgw.front" if i == 0 else f"rgw.{i}", "", "127.0.0.1")
                      for i in range(rgws)]
        return
    from xo import lab as xolab

    try:
        testbed = xolab.Lab.load(state.lab)
    except (OSError, xolab.LabError) as exc:
        raise CephError(f"lab {state.lab!r} not found ({exc}); create it with "
                        f"`xo lab up --name {state.lab} --targets N`") from exc
    targets = testbed.targets
    if osds > len(targets):
        raise CephError(f"lab {state.lab} has {len(targets)} target hosts, "
                        f"{osds} OSDs asked (one OSD per target host)")
    host = testbed.host
    state.mon = Member("mon.a", host.netns, host.ipv4)
    state.osds = [Member(f"osd.{i}", t.netns, t.ipv4) for i, t in enumerate(targets[:osds])]
    # The front's radosgw on the host, one beside each OSD.
    state.rgws = [Member("rgw.front", host.netns, host.ipv4)] + [
        Member(f"rgw.{t.name}", t.netns, t.ipv4) for t in targets[:osds]]


def vstart(workdir: str | Path, *, osds: int = 3, layout: str = "loopback", lab: str = "",
           rgws: int = 1, objectstore: str = "memstore", xo: bool = False,
           memstore_bytes: int = 4 << 30, force: bool = False, threshold: int = 1 << 20,
           tls_cert: str | Path = "", tls_key: str | Path = "",
           progress: Callable[[str], None] = lambda s: None) -> ClusterState:
    """Bring a cluster up in workdir; on any failure stop what was started.
    With tls_cert and tls_key (PEM files) the XO front also serves HTTPS on
    FRONT_TLS_PORT."""
    if layout not in ("loopback", "lab"):
        raise CephError(f"layout {layout!r}: loopback or lab")
    if layout == "lab" and not lab:
        raise CephError("the lab layout needs a lab name (--lab NAME)")
    if objectstore not in ("memstore", "bluestore"):
        raise CephError(f"objectstore {objectstore!r}: memstore or bluestore")
    if not 1 <= osds <= 32:
        raise CephError(f"{osds} OSDs: 1..32")
    if xo and layout != "lab":
        raise CephError("the XO front and agents need the lab layout (one OSD per host "
                        "namespace): connections move between hosts")
    if bool(tls_cert) != bool(tls_key):
        raise CephError("HTTPS needs both a certificate (--tls-cert) and its key (--tls-key)")
    if tls_cert and not xo:
        raise CephError("HTTPS is served by the XO front: --tls-cert needs --xo")
    for pem in (tls_cert, tls_key):
        if pem and not Path(pem).is_file():
            raise CephError(f"{pem}: no such file")
    for tool in ("ceph-mon", "ceph-mgr", "ceph-osd", "radosgw", "ceph", "radosgw-admin",
                 "monmaptool", "nsenter"):
        if shutil.which(tool) is None:
            raise CephError(f"{tool} not found: run ci/install.sh (it installs Debian's "
                            f"Ceph packages)")
    w = Path(workdir).resolve()
    probe = ClusterState(str(w), "", layout, lab)
    _layout_members(probe, osds, rgws)  # a missing or small lab fails here, before any change
    if (w / STATE_FILE).exists():
        old = ClusterState.load(w)
        if any(p.alive() for p in old.procs):
            if not force:
                raise CephError(f"a cluster is running in {w}; `xo ceph stop --dir {w}` "
                                f"first (or --force)")
            stop(w)
    if w.exists():
        shutil.rmtree(w)
    (w / "log").mkdir(parents=True)
    (w / "run").mkdir()
    state = ClusterState(str(w), str(uuid.uuid4()), layout, lab, objectstore, xo=xo,
                         started_at=time.time(), threshold=threshold,
                         tls_cert=str(Path(tls_cert).resolve()) if tls_cert else "",
                         tls_key=str(Path(tls_key).resolve()) if tls_key else "")
    _layout_members(state, osds, rgws if layout == "loopback" else 1)
    state.conf.write_text(render_conf(state, memstore_bytes))
    state.save()
    try:
        _bring_up(state, progress)
    except BaseException:
        stop(w)
        raise
    return state


def _spawn(state: ClusterState, name: str, argv: list[str], netns: str) -> Proc:
    proc = spawn(name, argv, netns=netns, log=state.path / "log" / f"{name}.out",
                 cwd=state.path)
    state.procs.append(proc)
    state.save()
    return proc


def _bring_up(state: ClusterState, progress: Callable[[str], None]) -> None:
    w, conf = state.path, str(state.conf)
    mon = state.mon
    assert mon is not None
    t0 = time.monotonic()
    progress("mon")
    subprocess.run(["monmaptool", "--create", "--fsid", state.fsid, "--addv", "a",
                    f"[{state.mon_addr}]", str(w / "monmap")], check=True,
                   capture_output=True)
    (w / mon.name).mkdir()
    _run(["ceph-mon", "-c", conf, "-i", "a", "--mkfs", "--monmap", str(w / "monmap")],
         "ceph-mon --mkfs", mon.netns)
    mon_proc = _spawn(state, mon.name, ["ceph-mon", "-f", "-c", conf, "-i", "a"], mon.netns)
    wait_until(lambda: ceph_cmd(state, "mon", "stat", timeout=3).returncode == 0,
               "the monitor", START_TIMEOUT, [state.log(mon.name)], [mon_proc])
    progress("mgr")
    (w / "mgr.x").mkdir()
    _spawn(state, "mgr.x", ["ceph-mgr", "-f", "-c", conf, "-i", "x"], mon.netns)

    with Mon(state) as monc:
        _osds_and_pools(state, monc, progress)
    progress("users, zone placement")
    for uid, display in USERS.items():
        access, secret = secrets.token_hex(10).upper(), secrets.token_urlsafe(30)
        _run_tool(state, "radosgw-admin", "user", "create", f"--uid={uid}",
                  f"--display-name={display}", f"--access-key={access}",
                  f"--secret-key={secret}")
        state.users[uid] = S3User(uid, access, secret)
    _zone_setup(state)  # the first radosgw-admin call above created the default zone
    state.save()
    _write_credentials(state)

    progress(f"{len(state.rgws)} radosgw")
    rgw_procs = [_spawn(state, rgw.name, ["radosgw", "-f", "-c", conf, "-n",
                                          f"client.{rgw.name}"], rgw.netns)
                 for rgw in state.rgws]
    for i, (rgw, proc) in enumerate(zip(state.rgws, rgw_procs, strict=True)):
        port = RGW_PORT + (i if state.layout == "loopback" else 0)
        wait_until(lambda r=rgw, p=port: _http_ok(r.netns, "127.0.0.1"
                                                  if state.layout == "lab" else r.ip, p),
                   f"{rgw.name} to answer HTTP", START_TIMEOUT, [state.log(rgw.name)], [proc])
    if state.xo:
        progress("XO front and agents")
        from xo.ceph import service

        service.start_xo(state, state.threshold)
    state.save()
    progress(f"up in {time.monotonic() - t0:.1f} s")


def _osds_and_pools(state: ClusterState, monc: Mon, progress: Callable[[str], None]) -> None:
    w, conf = state.path, str(state.conf)
    progress(f"{len(state.osds)} OSDs ({state.objectstore})")
    ids = []
    for osd in state.osds:
        osd_uuid = str(uuid.uuid4())
        out = monc.command("osd new", uuid=osd_uuid)
        got = out.get("osdid") if isinstance(out, dict) else out
        if str(got) != osd.name.split(".")[1]:
            raise CephError(f"osd new gave id {got!r} for {osd.name}")
        ids.append((osd, osd_uuid))

    def mkfs(item: tuple[Member, str]) -> None:
        osd, osd_uuid = item
        (w / osd.name).mkdir()
        _run(["ceph-osd", "-c", conf, "-i", osd.name.split(".")[1], "--mkfs",
              "--osd-uuid", osd_uuid], f"ceph-osd --mkfs ({osd.name})", osd.netns)

    with ThreadPoolExecutor(max_workers=len(ids)) as pool:
        list(pool.map(mkfs, ids))
    osd_procs = [_spawn(state, osd.name, ["ceph-osd", "-f", "-c", conf, "-i",
                                          osd.name.split(".")[1]], osd.netns)
                 for osd in state.osds]

    def all_up() -> bool:
        st = monc.command("osd stat")
        return int(st["num_up_osds"]) == len(state.osds) == int(st["num_in_osds"])

    wait_until(all_up, "all OSDs up and in", START_TIMEOUT,
               [state.log(o.name) for o in state.osds], osd_procs)
    progress("pools")
    _create_pools(state, monc)
    wait_until(lambda: _pgs_active(monc), "all placement groups active", START_TIMEOUT,
               [state.log(o.name) for o in state.osds], osd_procs)


def _run(argv: list[str], what: str, netns: str = "", timeout: float = 60) -> None:
    try:
        res = subprocess.run(netns_argv(netns, argv), capture_output=True, text=True,
                             timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise CephError(f"{what} did not finish in {timeout:.0f} s") from exc
    if res.returncode != 0:
        raise CephError(f"{what} failed (exit {res.returncode}): "
                        f"{(res.stderr or res.stdout).strip()[-800:]}")


def _run_tool(state: ClusterState, tool: str, *args: str) -> str:
    return ceph_cmd(state, *args, tool=tool).stdout


def _create_pools(state: ClusterState, monc: Mon) -> None:
    """The RGW pools, created before radosgw starts (else its first requests
    wait for them), in parallel: the mon batches their map changes."""
    def replicated(pool_pgs: tuple[str, int]) -> None:
        pool, pgs = pool_pgs
        monc.command("osd pool create", pool=pool, pg_num=pgs, pgp_num=pgs,
                     pool_type="replicated")
        monc.command("osd pool application enable", pool=pool, app="rgw")

    def erasure() -> None:
        monc.command("osd erasure-code-profile set", name=EC_PROFILE,
                     profile=["k=2", "m=1", "crush-failure-domain=osd"])
        monc.command("osd pool create", pool=EC_DATA_POOL, pg_num=32, pgp_num=32,
                     pool_type="erasure", erasure_code_profile=EC_PROFILE)
        monc.command("osd pool application enable", pool=EC_DATA_POOL, app="rgw")

    pools = [(p, 8) for p in RGW_POOLS] + [(DATA_POOL, 32)]
    with ThreadPoolExecutor(max_workers=len(pools) + 1) as pool:
        futures = [pool.submit(replicated, p) for p in pools]
        if len(state.osds) >= 3:
            futures.append(pool.submit(erasure))
        for fut in futures:
            fut.result()


def _pgs_active(monc: Mon) -> bool:
    st = monc.command("pg stat", mgr=True)
    summary = st.get("pg_summary", st)
    total = int(summary.get("num_pgs", 0))
    active = sum(int(s["num"]) for s in summary.get("num_pg_by_state", [])
                 if "active" in s["name"].split("+"))
    return total > 0 and active == total


def _zone_setup(state: ClusterState) -> None:
    """The default zone (radosgw-admin creates it on first use) with a second
    placement target whose data pool is erasure-coded."""
    if len(state.osds) < 3:
        return
    _run_tool(state, "radosgw-admin", "zonegroup", "placement", "add",
              "--rgw-zonegroup=default", f"--placement-id={EC_PLACEMENT}")
    _run_tool(state, "radosgw-admin", "zone", "placement", "add", f"--rgw-zone={ZONE}",
              f"--placement-id={EC_PLACEMENT}", f"--data-pool={EC_DATA_POOL}",
              "--index-pool=default.rgw.buckets.index",
              "--data-extra-pool=default.rgw.buckets.non-ec")


def _write_credentials(state: ClusterState) -> None:
    path = state.path / "s3-credentials.json"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({uid: asdict(u) for uid, u in state.users.items()}, f, indent=2)


def _http_ok(netns: str, ip: str, port: int) -> bool:
    res = subprocess.run(netns_argv(netns, ["curl", "-s", "-o", "/dev/null", "-w",
                                            "%{http_code}", "-m", "2",
                                            f"http://{ip}:{port}/"]),
                         capture_output=True, text=True, timeout=10)
    return res.stdout.strip() == "200"


# ---- stop and status ------------------------------------------------------------------


STOP_ORDER = ("front", "agent", "rgw", "osd", "mgr", "mon")


def stop(workdir: str | Path, timeout: float = 10.0) -> list[str]:
    """Stop every process this cluster started (XO parts and radosgw first,
    the mon last); returns the names that needed SIGKILL. Idempotent."""
    state = ClusterState.load(workdir)
    killed: list[str] = []
    for kind in STOP_ORDER:
        group = [p for p in state.procs if p.name.split(".")[0] == kind]
        # OSDs: memstore would save every object to disk on a clean stop;
        # its data is thrown away anyway.
        grace = 0.5 if kind == "osd" and state.objectstore == "memstore" else timeout
        killed += stop_all(group, grace) if group else []
    killed = [k for k in killed if not k.startswith("osd.") or state.objectstore != "memstore"]
    from xo.ceph.service import remove_pins

    remove_pins(state.pin_dirs)
    state.save()
    return killed


def status(workdir: str | Path) -> dict[str, Any]:
    state = ClusterState.load(workdir)
    procs = {p.name: {"pid": p.pid, "alive": p.alive(), "netns": p.netns, "log": p.log}
             for p in state.procs}
    out: dict[str, Any] = {"workdir": state.workdir, "fsid": state.fsid,
                           "layout": state.layout, "lab": state.lab,
                           "objectstore": state.objectstore, "processes": procs,
                           "rgw": [state.rgw_endpoint(i) for i in range(len(state.rgws))],
                           "front": state.front_endpoint if state.xo else None,
                           "front_https": state.front_tls_endpoint if state.xo else None,
                           "users": {u: asdict(v) for u, v in state.users.items()}}
    mon = state.proc(state.mon.name) if state.mon else None
    if mon is not None and mon.alive():
        try:
            out["ceph"] = ceph_json(state, "status", timeout=5)
        except (CephError, ValueError) as exc:
            out["ceph_error"] = str(exc)
    return out
