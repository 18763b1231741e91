"""Bringing labs up and down: the topology built from the namespace helpers,
the description saved, the XDP preparation of a member's bridge port, the
live status of a lab, and teardown that leaves nothing behind."""

from __future__ import annotations

import contextlib
import logging
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

from pyroute2 import netns
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl.ifaddrmsg import IFA_F_TENTATIVE

from xo.lab.errors import LabError, LabExistsError, LabNotFoundError
from xo.lab.model import (
    BRIDGE_SYSCTLS,
    BULK_CLASS,
    CLIENT_HOST_ID,
    CONTROL_CLASS,
    CONTROL_PORTS,
    CONTROL_RATE_DIVISOR,
    DEFAULT_LAB_NAME,
    DEFAULT_TARGETS,
    FIRST_TARGET_HOST_ID,
    HTB_QUANTUM_BYTES,
    IPV4_NETWORK,
    IPV6_NETWORK,
    LAB_NAME_RE,
    LAB_NETNS_RE,
    LAB_STATE_DIR,
    LB_HOST_ID,
    MAC_PREFIX,
    MAX_TARGETS,
    MEMBER_SYSCTLS,
    PIN_ROOT,
    READY_TIMEOUT_SECONDS,
    Lab,
    LabHost,
    TbfShape,
    bridge_ifname,
    bridge_netns,
    lab_state_path,
    member_ifname,
    member_netns,
    parse_rate,
    port_ifname,
    target_member_name,
    validate_lab_name,
)
from xo.lab.namespaces import (
    NETNS_DIR,
    add_addresses,
    add_bridge,
    add_veth,
    create_netns,
    in_netns,
    iproute_in,
    netns_exists,
    netns_path,
    pids_in_namespaces,
    remove_netns,
    run,
)

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- up


def _host_id_addresses(host_id: int) -> tuple[str, str]:
    ipv4 = IPV4_NETWORK[host_id]
    # The IPv6 interface id spells the same digits as the last IPv4 octet (…::10 for
    # 198.18.0.10) so the two addresses of a member are easy to match up.
    ipv6 = IPV6_NETWORK[int(str(host_id), 16)]
    return str(ipv4), str(ipv6)


def _member_plan(targets: int) -> list[tuple[str, str, int]]:
    """(name, role, host id) of every member, client first."""
    plan = [("client", "client", CLIENT_HOST_ID), ("host", "host", LB_HOST_ID)]
    plan += [
        (target_member_name(index), "target", FIRST_TARGET_HOST_ID + index)
        for index in range(targets)
    ]
    return plan


def _tc(ns: str, *args: str) -> None:
    res = subprocess.run(["tc", "-n", ns, *args], capture_output=True, text=True)
    if res.returncode != 0:
        raise LabError(f"tc -n {ns} {' '.join(args)}: {res.stderr.strip() or res.returncode}")


def _add_shaper(ns: str, ifname: str, shape: TbfShape,
                control_ports: tuple[int, ...] = CONTROL_PORTS) -> None:
    """Shape ifname to shape.rate_bps with control traffic first.

    An htb root with one class at the link rate (rate = ceil, so the total
    stays the link's) and two leaves under it: control (prio 0) and bulk
    (prio 1, the default), both allowed the whole link (ceil). u32 filters
    put TCP segments from or to a control port (IPv4 and IPv6) in the control
    leaf: a handoff's messages never wait behind other connections' response
    bytes queued on the same link. Each leaf is a byte fifo as short as the
    tbf queue the lab used before (burst + 20 ms at the rate).
    """
    rate = f"{shape.rate_bps}bit"
    control_rate = max(1, shape.rate_bps // CONTROL_RATE_DIVISOR)
    burst = ["burst", str(shape.burst_bytes), "cburst", str(shape.burst_bytes),
             "quantum", str(HTB_QUANTUM_BYTES)]
    _tc(ns, "qdisc", "add", "dev", ifname, "root", "handle", "1:", "htb",
        "default", f"{BULK_CLASS:x}")
    _tc(ns, "class", "add", "dev", ifname, "parent", "1:", "classid", "1:1", "htb",
        "rate", rate, "ceil", rate, *burst)
    for minor, prio, class_rate in ((CONTROL_CLASS, 0, control_rate),
                                    (BULK_CLASS, 1, shape.rate_bps - control_rate)):
        _tc(ns, "class", "add", "dev", ifname, "parent", "1:1", "classid", f"1:{minor:x}",
            "htb", "rate", f"{class_rate}bit", "ceil", rate, "prio", str(prio), *burst)
        _tc(ns, "qdisc", "add", "dev", ifname, "parent", f"1:{minor:x}",
            "handle", f"{minor:x}:", "bfifo", "limit", str(shape.limit_bytes))
    for port in control_ports:
        for proto, match, prio in (("ip", "ip", "1"), ("ipv6", "ip6", "2")):
            for end in ("sport", "dport"):
                _tc(ns, "filter", "add", "dev", ifname, "parent", "1:", "protocol", proto,
                    "prio", prio, "u32", "match", match, "protocol", "6", "0xff",
                    "match", match, end, str(port), "0xffff", "flowid", f"1:{CONTROL_CLASS:x}")


def _in_order_rx(ns: str, ifname: str) -> None:
    """Make a veth deliver what it receives in the order it was sent.

    A veth hands each packet to the receive backlog of the CPU that sent it;
    when the sender moves between CPUs, two backlogs run at once and a flow's
    segments overtake each other (the client then resends segments that were
    only late: TCPSACKReorder, fast retransmits). A real link and one NIC queue
    keep a flow in order, so the lab steers every received packet to one
    CPU's backlog (RPS, CPU 0), the same for every member and mode."""
    path = f"/sys/class/net/{ifname}/queues/rx-0/rps_cpus"
    res = run(ns, ["sh", "-c", f"echo 1 > {path}"], sysfs=True,
              capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise LabError(f"{ns}: cannot set {path}: {res.stderr.strip()}")


def _build_bridge(lab_name: str) -> int:
    ns = bridge_netns(lab_name)
    create_netns(ns, BRIDGE_SYSCTLS)
    return add_bridge(ns, bridge_ifname(lab_name))


def _build_member(
    lab_name: str,
    name: str,
    role: str,
    host_id: int,
    bridge_index: int,
    rate_bps: int | None,
) -> LabHost:
    ns = member_netns(lab_name, name)
    ifname = member_ifname(lab_name, name)
    port = port_ifname(lab_name, name)
    ipv4, ipv6 = _host_id_addresses(host_id)
    mac = f"{MAC_PREFIX}:{host_id:02x}"
    shape = TbfShape.for_rate(rate_bps) if rate_bps is not None else None

    create_netns(ns, MEMBER_SYSCTLS)
    # The veth is born with one end in the bridge namespace and the other in the
    # member's namespace: it never exists in the root namespace.
    port_index, _ = add_veth(bridge_netns(lab_name), port, ns, ifname, peer_mac=mac, up=False)
    with iproute_in(bridge_netns(lab_name)) as ipr:
        ipr.link("set", index=port_index, master=bridge_index, state="up")
    if shape is not None:
        _add_shaper(bridge_netns(lab_name), port, shape)  # bridge -> member direction
    _in_order_rx(bridge_netns(lab_name), port)
    _in_order_rx(ns, ifname)

    index = add_addresses(ns, ifname, [f"{ipv4}/{IPV4_NETWORK.prefixlen}",
                                       f"{ipv6}/{IPV6_NETWORK.prefixlen}"])
    if shape is not None:
        _add_shaper(ns, ifname, shape)  # member -> bridge direction
    with iproute_in(ns) as ipr:
        actual_mac = ipr.link("get", index=index)[0].get_attr("IFLA_ADDRESS")

    return LabHost(
        name=name,
        role=role,
        netns=ns,
        ifname=ifname,
        ifindex=index,
        mac=actual_mac,
        ipv4=ipv4,
        ipv6=ipv6,
        ipv4_prefixlen=IPV4_NETWORK.prefixlen,
        ipv6_prefixlen=IPV6_NETWORK.prefixlen,
        port_ifname=port,
        port_ifindex=port_index,
        rate_bps=rate_bps,
        tbf=shape,
    )


def _member_ready(member: LabHost) -> bool:
    with iproute_in(member.netns) as ipr:
        link = ipr.link("get", index=member.ifindex)[0]
        if link.get_attr("IFLA_OPERSTATE") != "UP":
            return False
        for address in ipr.addr("dump", index=member.ifindex):
            flags = address.get_attr("IFA_FLAGS") or address["flags"]
            if flags & IFA_F_TENTATIVE:
                return False
    return True


def _wait_ready(testbed: Lab, timeout: float = READY_TIMEOUT_SECONDS) -> None:
    deadline = time.monotonic() + timeout
    pending = list(testbed.hosts)
    while pending:
        pending = [member for member in pending if not _member_ready(member)]
        if not pending:
            return
        if time.monotonic() > deadline:
            names = ", ".join(member.name for member in pending)
            raise LabError(f"lab {testbed.name}: links of {names} not up after {timeout:g} s")
        time.sleep(0.02)


def lab_in_use(name: str) -> list[str]:
    """What already exists under lab name `name`: its JSON and/or namespaces."""
    found = list(_lab_namespaces_on_disk().get(name, []))
    if lab_state_path(name).exists():
        found.insert(0, str(lab_state_path(name)))
    return found


def _claim_name(name: str, force: bool) -> None:
    """Make sure nothing named like lab `name` exists (tearing it down if `force`)."""
    existing = lab_in_use(name)
    if not existing:
        return
    if not force:
        raise LabExistsError(
            f"lab {name!r} already exists ({', '.join(existing)}); "
            f"tear it down with `xo lab down --name {name}` or recreate it with --force"
        )
    down(name)


def _build(name: str, targets: int, rate_bps: int | None, client_rate_bps: int | None) -> Lab:
    bridge_index = _build_bridge(name)
    members = [
        _build_member(
            name,
            member_name,
            role,
            host_id,
            bridge_index,
            client_rate_bps if role == "client" else rate_bps,
        )
        for member_name, role, host_id in _member_plan(targets)
    ]
    testbed = Lab(
        name=name,
        bridge_netns=bridge_netns(name),
        bridge_ifname=bridge_ifname(name),
        ipv4_network=str(IPV4_NETWORK),
        ipv6_network=str(IPV6_NETWORK),
        rate_bps=rate_bps,
        client_rate_bps=client_rate_bps,
        hosts=members,
        sysctls=dict(MEMBER_SYSCTLS),
        created_at=time.time(),
    )
    _wait_ready(testbed)
    testbed.save()
    return testbed


def _validated_parameters(
    name: str, targets: int, rate: str | int | None, client_rate: str | int | None
) -> tuple[int | None, int | None]:
    validate_lab_name(name)
    if not 1 <= targets <= MAX_TARGETS:
        raise LabError(f"targets must be between 1 and {MAX_TARGETS}, not {targets}")
    return parse_rate(rate), parse_rate(client_rate)


def up(
    name: str = DEFAULT_LAB_NAME,
    targets: int = DEFAULT_TARGETS,
    rate: str | int | None = None,
    *,
    client_rate: str | int | None = None,
    force: bool = False,
) -> Lab:
    """Bring a lab up and save its description; see `lab()` for a self-cleaning variant.

    `rate` limits the host and target links (both directions, tbf), `client_rate` the
    client link; None means unlimited. Fails with LabExistsError if anything named like
    this lab exists, unless `force`, which tears the old one down first. On any failure
    (also KeyboardInterrupt) everything created so far is removed again.
    """
    rate_bps, client_rate_bps = _validated_parameters(name, targets, rate, client_rate)
    _claim_name(name, force)
    try:
        return _build(name, targets, rate_bps, client_rate_bps)
    except BaseException:
        # Also on KeyboardInterrupt: never leave half a lab behind.
        with _deferred_sigint():
            down(name)
        raise


# --------------------------------------------------------------------------- XDP


# The bridge port's checksum offload, as ethtool names it (veth: NETIF_F_HW_CSUM).
PORT_CSUM_FEATURE = "tx-checksum-ip-generic"


def prepare_xdp_tx(testbed: Lab, member: str | LabHost) -> None:
    """Let an XDP program on `member`'s veth send frames back with XDP_TX.

    Two things a real NIC gives an XDP program for free have to be made for a veth
    (kernel 6.18; see docs/steering.md, "XDP on veth", for the measurements):

    - A pass-through XDP program on the bridge-side port, the veth's peer. XDP_TX on
      a veth queues the frame on the peer's NAPI ring, and only wakes the peer's NAPI
      if the peer has an XDP program (veth_xdp_flush checks the peer's xdp_prog). Without
      NAPI on the peer the frames are dropped; with NAPI from GRO alone (ethtool -K
      <port> gro on) they are queued but never polled. XO's own program with a private,
      empty flow map passes everything.
    - Complete checksums on what the port sends to the member. Traffic between
      namespaces is CHECKSUM_PARTIAL (the TCP checksum field holds only the pseudo
      header sum), which tc and the stack know from the skb but XDP cannot see; XDP_TX
      turns the packet into a bare frame, and the receiver would check the partial
      sum and drop the segment (TcpInCsumErrors). With checksum offload off on the
      port, the kernel completes every checksum before handing the frame over, as a
      wire would.

    Idempotent; undone when the lab is torn down (the links go).
    """
    from pyroute2.ethtool import Ethtool

    from xo.steer import Prog, Steer

    host = testbed.member(member)
    with in_netns(testbed.bridge_netns):
        ethtool = Ethtool()
    try:
        features = ethtool.get_features(host.port_ifname)
        if features.features[PORT_CSUM_FEATURE].enable:
            features.features[PORT_CSUM_FEATURE].enable = False
            ethtool.set_features(host.port_ifname, features)
        if ethtool.get_features(host.port_ifname).features[PORT_CSUM_FEATURE].enable:
            raise LabError(f"cannot turn off checksum offload on {host.port_ifname}")
    finally:
        ethtool.close()

    with iproute_in(testbed.bridge_netns) as ipr:
        link = ipr.link("get", index=host.port_ifindex)[0]
        xdp = link.get_attr("IFLA_XDP")
        if xdp is not None and xdp.get_attr("IFLA_XDP_PROG_ID"):
            return  # already has its program
    # max_flows=1: the map is never written; nothing to preallocate.
    passthrough = Steer(pin=False, max_flows=1)
    try:
        passthrough.attach(host.port_ifindex, Prog.XDP,
                           netns=str(netns_path(testbed.bridge_netns)))
    finally:
        # The kernel keeps the program (and its map) attached until the port goes.
        passthrough.close(keep_attached=True)


# --------------------------------------------------------------------------- down


def _lab_namespaces_on_disk() -> dict[str, list[str]]:
    """Lab name -> namespaces in /run/netns that follow the lab naming scheme."""
    labs: dict[str, list[str]] = {}
    for ns in sorted(netns.listnetns(str(NETNS_DIR))):
        match = LAB_NETNS_RE.fullmatch(ns)
        if match:
            labs.setdefault(match["lab"], []).append(ns)
    return labs


def list_labs() -> list[str]:
    """Names of all labs that have a description or at least one namespace."""
    names = set(_lab_namespaces_on_disk())
    if LAB_STATE_DIR.is_dir():
        names.update(
            path.stem for path in LAB_STATE_DIR.glob("*.json") if LAB_NAME_RE.fullmatch(path.stem)
        )
    return sorted(names)


def down(name: str = DEFAULT_LAB_NAME) -> list[str]:
    """Remove a lab: its links, namespaces and description. Idempotent.

    Works from the naming scheme, not only from the JSON, so a lab whose `up` was
    interrupted is removed completely too. Returns the namespaces removed.
    """
    validate_lab_name(name)
    namespaces = set(_lab_namespaces_on_disk().get(name, []))
    with contextlib.suppress(LabError, ValueError, TypeError, KeyError):  # no/bad JSON
        namespaces.update(Lab.load(name).namespaces)
    present = sorted(ns for ns in namespaces if netns_exists(ns))
    for ns, pids in pids_in_namespaces(present).items():
        log.warning(
            "processes %s still run in %s; its links are removed, the namespace itself "
            "is freed when they exit",
            pids,
            ns,
        )
    # Bridge namespace first: deleting its ports removes every member's veth at once.
    for ns in sorted(present, key=lambda ns: not ns.endswith("-br")):
        remove_netns(ns)
    with contextlib.suppress(FileNotFoundError):
        lab_state_path(name).unlink()
    _remove_pin_dirs(name)
    return present


def _remove_pin_dirs(name: str) -> None:
    for pin_dir in PIN_ROOT.glob(f"{name}-*"):
        if not LAB_NETNS_RE.match(f"xo-{pin_dir.name}"):
            continue  # another lab whose name merely starts the same way
        subprocess.run(["umount", "-l", str(pin_dir)], capture_output=True)
        shutil.rmtree(pin_dir, ignore_errors=True)


def down_all() -> dict[str, list[str]]:
    """Remove every lab (by JSON or by namespace naming scheme). Returns lab -> namespaces."""
    return {name: down(name) for name in list_labs()}


# --------------------------------------------------------------------------- context manager


@contextlib.contextmanager
def _deferred_sigint() -> Iterator[None]:
    """Hold back Ctrl-C during teardown so it cannot stop half-way; re-raise after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []

    def remember(signum: int, _frame: object) -> None:
        received.append(signum)

    previous = signal.signal(signal.SIGINT, remember)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt


@contextlib.contextmanager
def lab(
    name: str = DEFAULT_LAB_NAME,
    targets: int = DEFAULT_TARGETS,
    rate: str | int | None = None,
    *,
    client_rate: str | int | None = None,
    force: bool = False,
) -> Iterator[Lab]:
    """Bring a lab up for the duration of a `with` block; always tear it down.

    Teardown (stop the processes started with Lab.popen, then `down`) runs also when
    the block or the bring-up raises, including KeyboardInterrupt. A name already in
    use raises LabExistsError and leaves the existing lab alone (unless `force`).
    """
    rate_bps, client_rate_bps = _validated_parameters(name, targets, rate, client_rate)
    _claim_name(name, force)  # outside the try: an existing lab is not ours to remove
    testbed: Lab | None = None
    try:
        testbed = _build(name, targets, rate_bps, client_rate_bps)
        yield testbed
    finally:
        _teardown(name, testbed)


def _teardown(name: str, testbed: Lab | None) -> None:
    with _deferred_sigint():
        try:
            if testbed is not None:
                testbed.stop_processes()
        finally:
            down(name)


# --------------------------------------------------------------------------- status


@dataclass
class MemberState:
    """What is live right now for one member."""

    netns_exists: bool
    link_state: str  # operstate of its veth, or "missing"


def _member_state(member: LabHost) -> MemberState:
    if not member.exists():
        return MemberState(netns_exists=False, link_state="missing")
    try:
        with iproute_in(member.netns) as ipr:
            links = ipr.link("get", index=member.ifindex)
            state = links[0].get_attr("IFLA_OPERSTATE") or "unknown"
    except (LabError, OSError, NetlinkError) as error:  # namespace or link gone
        log.debug("link of %s: %s", member.name, error)
        state = "missing"
    return MemberState(netns_exists=True, link_state=state)


def lab_status(name: str) -> dict[str, Any]:
    """Description plus live state of one lab, as plain data (what `status --json` prints)."""
    validate_lab_name(name)
    on_disk = _lab_namespaces_on_disk().get(name, [])
    try:
        testbed = Lab.load(name)
    except LabNotFoundError:
        return {"name": name, "described": False, "namespaces": on_disk}
    data = testbed.to_dict()
    data["described"] = True
    data["bridge_netns_exists"] = netns_exists(testbed.bridge_netns)
    for member_data, member in zip(data["hosts"], testbed.hosts, strict=True):
        member_data.update(asdict(_member_state(member)))
    data["namespaces"] = on_disk
    return data

