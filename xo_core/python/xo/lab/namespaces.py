"""Network namespaces and links: the one place XO creates them.

The lab builds its topology from these helpers, and so does every test or
benchmark that needs namespaces of its own (a veth pair, a small bridge):
create and remove a namespace (with its sysctls), a veth pair born with its
ends in two namespaces (never in the root namespace), a bridge, addresses;
run code or processes inside a namespace. All netlink work goes through
pyroute2 sockets opened inside the namespace in question.

    with scoped_namespaces(["xo-ab12-a", "xo-ab12-b"]):
        add_veth("xo-ab12-a", "xoab12a", "xo-ab12-b", "xoab12b")
        add_addresses("xo-ab12-a", "xoab12a", ["198.18.5.1/24"])
        ...                       # both namespaces are gone after the block
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import ipaddress
import logging
import os
import signal
import subprocess
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

from pyroute2 import IPRoute, netns
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl.ifaddrmsg import IFA_F_NODAD

from xo.lab.errors import LabError, LabExistsError

log = logging.getLogger(__name__)

NETNS_DIR = Path("/run/netns")

_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


class InNamespace(Protocol):
    """Anything that names its namespace (a lab member, a LabHost)."""

    netns: str


NetnsLike = str | InNamespace


def netns_name(ns: NetnsLike) -> str:
    return ns if isinstance(ns, str) else ns.netns


def netns_path(ns: str) -> Path:
    return NETNS_DIR / ns


def netns_exists(ns: str) -> bool:
    return netns_path(ns).exists()


# --------------------------------------------------------------------------- entering


def _setns(fd: int) -> None:
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"setns: {os.strerror(error)}")


@contextlib.contextmanager
def in_netns(ns: NetnsLike) -> Iterator[None]:
    """Move the calling thread into network namespace `ns` and back on exit.

    Only this thread moves (setns(2) on a thread); threads already running are
    unaffected. Sockets created inside keep that namespace for their whole life, also
    after the block ends; threads and processes started inside inherit it.
    """
    name = netns_name(ns)
    try:
        target_fd = os.open(netns_path(name), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise LabError(f"network namespace {name!r} does not exist") from None
    try:
        home_fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            try:
                _setns(target_fd)
                yield
            finally:
                # Going home is harmless if we never left. If it fails, this thread is
                # stranded in the other namespace: let that error propagate rather than
                # carry on in the wrong place.
                _setns(home_fd)
        finally:
            os.close(home_fd)
    finally:
        os.close(target_fd)


def write_sysctls(sysctls: dict[str, str]) -> None:
    """Write sysctls ("net/ipv4/x" or "net.ipv4.x") in the calling thread's namespace.

    /proc/sys/net resolves to the namespace of the thread that opens the file, so
    inside in_netns() this writes into that namespace.
    """
    for key, value in sysctls.items():
        Path("/proc/sys", key if "/" in key else key.replace(".", "/")).write_text(value)


@contextlib.contextmanager
def iproute_in(ns: str) -> Iterator[IPRoute]:
    """A pyroute2 IPRoute talking to namespace `ns`.

    The netlink socket is created while the thread is in `ns`, so it talks to `ns`.
    (IPRoute(netns=...) would fork a helper per call and create a missing namespace.)
    """
    with in_netns(ns):
        ipr = IPRoute()
    try:
        yield ipr
    finally:
        ipr.close()


def netns_inode(ns: str) -> tuple[int, int] | None:
    try:
        stat = os.stat(netns_path(ns))
    except FileNotFoundError:
        return None
    return stat.st_dev, stat.st_ino


def pids_in_namespaces(namespaces: Sequence[str]) -> dict[str, list[int]]:
    """PIDs of processes whose network namespace is one of `namespaces` (diagnostic)."""
    inode_to_ns: dict[tuple[int, int], str] = {}
    for ns in namespaces:
        inode = netns_inode(ns)
        if inode is not None:
            inode_to_ns[inode] = ns
    users: dict[str, list[int]] = {}
    if not inode_to_ns:
        return users
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = os.stat(f"/proc/{entry}/ns/net")
        except OSError:
            continue  # the process exited or is not ours to look at
        ns = inode_to_ns.get((stat.st_dev, stat.st_ino))
        if ns is not None:
            users.setdefault(ns, []).append(int(entry))
    return users


# --------------------------------------------------------------------------- creating


def create_netns(ns: str, sysctls: dict[str, str] | None = None) -> None:
    """Create namespace `ns` with lo up and `sysctls` written; an existing one is
    refused (LabExistsError), never reused."""
    if netns_exists(ns):
        raise LabExistsError(f"network namespace {ns} already exists")
    netns.create(ns)
    try:
        with in_netns(ns):
            write_sysctls(sysctls or {})
        with iproute_in(ns) as ipr:
            ipr.link("set", index=link_index(ipr, "lo"), state="up")
    except BaseException:
        remove_netns(ns)
        raise


def delete_links(ns: str) -> None:
    """Delete every link of `ns` but lo (bridge ports before bridges).

    Deleting a veth end deletes its peer too. Doing it explicitly (rather than
    relying on the namespace going away) matters when some process or socket still
    holds the namespace: its links would otherwise stay alive with it.
    """
    with iproute_in(ns) as ipr:
        links = [
            (link["index"], link.get_attr("IFLA_IFNAME"), link.get_attr("IFLA_LINKINFO"))
            for link in ipr.link("dump")
            if link.get_attr("IFLA_IFNAME") != "lo"
        ]

        def is_bridge(item: tuple[int, str, Any]) -> bool:
            info = item[2]
            return info is not None and info.get_attr("IFLA_INFO_KIND") == "bridge"

        # Ports before the bridge; a port may already be gone with its peer.
        for index, ifname, _ in sorted(links, key=is_bridge):
            try:
                ipr.link("del", index=index)
            except NetlinkError as error:
                if error.code != errno.ENODEV:
                    raise
                log.debug("link %s in %s already gone", ifname, ns)


def remove_netns(ns: str) -> None:
    """Remove namespace `ns` and its links. Idempotent."""
    try:
        delete_links(ns)
    except LabError:
        return  # vanished meanwhile
    except OSError as error:
        # E.g. the file exists but was never bind-mounted (creation interrupted):
        # setns() on it fails; removing the file below is all there is to do.
        log.debug("cannot enter %s (%s); removing it anyway", ns, error)
    try:
        netns.remove(ns)
    except FileNotFoundError:
        pass


@contextlib.contextmanager
def scoped_namespaces(names: Iterable[str],
               sysctls: dict[str, str] | None = None) -> Iterator[list[str]]:
    """Create the namespaces `names` for a `with` block and remove them all after,
    also when the block or the creation fails half-way (KeyboardInterrupt too)."""
    created: list[str] = []
    try:
        for ns in names:
            create_netns(ns, sysctls)
            created.append(ns)
        yield created
    finally:
        for ns in reversed(created):
            remove_netns(ns)


def link_index(ipr: IPRoute, ifname: str) -> int:
    indexes = ipr.link_lookup(ifname=ifname)
    if not indexes:
        raise LabError(f"link {ifname} not found")
    return int(indexes[0])


def link_info(ns: str, ifname: str) -> tuple[int, str]:
    """(ifindex, MAC address) of link `ifname` in `ns`."""
    with iproute_in(ns) as ipr:
        index = link_index(ipr, ifname)
        return index, str(ipr.link("get", index=index)[0].get_attr("IFLA_ADDRESS"))


def add_veth(ns: str, ifname: str, peer_ns: str, peer_ifname: str, *,
             mac: str | None = None, peer_mac: str | None = None,
             up: bool = True) -> tuple[int, int]:
    """A veth pair born with end `ifname` in `ns` and end `peer_ifname` in `peer_ns`:
    it never exists in the root namespace. Returns both ends' ifindexes."""
    peer: dict[str, Any] = {"ifname": peer_ifname}
    if peer_mac is not None:
        peer["address"] = peer_mac
    extra: dict[str, Any] = {"address": mac} if mac is not None else {}
    peer_fd = os.open(netns_path(peer_ns), os.O_RDONLY | os.O_CLOEXEC)
    try:
        peer["net_ns_fd"] = peer_fd
        with iproute_in(ns) as ipr:
            ipr.link("add", ifname=ifname, kind="veth", peer=peer, **extra)
            index = link_index(ipr, ifname)
            if up:
                ipr.link("set", index=index, state="up")
    finally:
        os.close(peer_fd)
    with iproute_in(peer_ns) as ipr:
        peer_index = link_index(ipr, peer_ifname)
        if up:
            ipr.link("set", index=peer_index, state="up")
    return index, peer_index


def add_bridge(ns: str, ifname: str) -> int:
    """A bridge in `ns` that forwards at once (no STP, no forward delay, no
    multicast snooping that could filter IPv6 neighbour discovery); up."""
    with iproute_in(ns) as ipr:
        ipr.link("add", ifname=ifname, kind="bridge", br_stp_state=0, br_forward_delay=0,
                 br_mcast_snooping=0)
        index = link_index(ipr, ifname)
        ipr.link("set", index=index, state="up")
    return index


def set_master(ns: str, ifname: str, bridge: str) -> None:
    """Make link `ifname` a port of `bridge` (both in `ns`) and set it up."""
    with iproute_in(ns) as ipr:
        ipr.link("set", index=link_index(ipr, ifname), master=link_index(ipr, bridge),
                 state="up")


def set_up(ns: str, ifname: str) -> int:
    """Set link `ifname` in `ns` up; returns its ifindex."""
    with iproute_in(ns) as ipr:
        index = link_index(ipr, ifname)
        ipr.link("set", index=index, state="up")
    return index


def add_addresses(ns: str, ifname: str, addresses: Iterable[str], *,
                  up: bool = True) -> int:
    """Add "address/prefix" entries to link `ifname` in `ns` (IPv6 without
    duplicate address detection, usable at once); returns its ifindex."""
    with iproute_in(ns) as ipr:
        index = link_index(ipr, ifname)
        for entry in addresses:
            iface = ipaddress.ip_interface(entry)
            flags = IFA_F_NODAD if iface.version == 6 else 0
            ipr.addr("add", index=index, address=str(iface.ip),
                     prefixlen=iface.network.prefixlen, flags=flags)
        if up:
            ipr.link("set", index=index, state="up")
    return index


def move_link(ns: str, ifname: str, to_ns: str) -> int:
    """Move link `ifname` from `ns` into `to_ns` (it loses its addresses and goes
    down, as the kernel does it); returns its ifindex there."""
    to_fd = os.open(netns_path(to_ns), os.O_RDONLY | os.O_CLOEXEC)
    try:
        with iproute_in(ns) as ipr:
            ipr.link("set", index=link_index(ipr, ifname), net_ns_fd=to_fd)
    finally:
        os.close(to_fd)
    with iproute_in(to_ns) as ipr:
        return link_index(ipr, ifname)


# --------------------------------------------------------------------------- processes


class NetnsProcess(subprocess.Popen):  # type: ignore[type-arg]
    """A background process started inside a namespace (see `popen`).

    `stop()` terminates it by PID: SIGTERM, then SIGKILL after `timeout`. When started
    in its own session (the default) the signal goes to its process group, so helpers
    it spawned (e.g. a shell pipeline) go too; nothing else is ever signalled.
    """

    netns: str = ""
    own_process_group: bool = False

    def stop(self, timeout: float = 5.0) -> int:
        """Terminate the process (if still running) and return its exit status."""
        if self.poll() is not None:
            return self.returncode
        self._signal(signal.SIGTERM)
        try:
            return self.wait(timeout)
        except subprocess.TimeoutExpired:
            self._signal(signal.SIGKILL)
            return self.wait()

    def _signal(self, signum: signal.Signals) -> None:
        # Only while the child is unreaped: its PID (and process group id) cannot have
        # been reused by anybody else yet.
        if self.returncode is not None:
            return
        try:
            if self.own_process_group:
                os.killpg(self.pid, signum)
            else:
                os.kill(self.pid, signum)
        except ProcessLookupError:
            pass  # exited in between; wait() will reap it

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
        super().__exit__(*exc_info)


def _ip_netns_exec_argv(ns: str, argv: Sequence[str]) -> list[str]:
    return ["ip", "netns", "exec", ns, *argv]


def run(
    ns: NetnsLike,
    argv: Sequence[str],
    *,
    sysfs: bool = False,
    **run_kwargs: Any,
) -> subprocess.CompletedProcess[Any]:
    """Run `argv` in namespace `ns` and wait for it; keyword arguments go to subprocess.run.

    By default the child is forked from a thread that is inside the namespace: it sees
    the host's /sys unchanged, so BPF objects pinned under /sys/fs/bpf stay visible.
    `sysfs=True` uses `ip netns exec` instead, which remounts /sys for the namespace
    (needed by tools that read /sys/class/net) and hides /sys/fs/bpf.
    """
    name = netns_name(ns)
    if sysfs:
        return subprocess.run(_ip_netns_exec_argv(name, argv), **run_kwargs)
    with in_netns(name):
        return subprocess.run(list(argv), **run_kwargs)


def popen(
    ns: NetnsLike,
    argv: Sequence[str],
    *,
    new_session: bool = True,
    sysfs: bool = False,
    **popen_kwargs: Any,
) -> NetnsProcess:
    """Start `argv` in the background in namespace `ns`; stop it with `.stop()`.

    Keyword arguments go to subprocess.Popen. `new_session` puts the child in its own
    session/process group (Ctrl-C in the terminal does not reach it; `stop()` stops
    its whole group). `sysfs` as for `run`.
    """
    name = netns_name(ns)
    command = _ip_netns_exec_argv(name, argv) if sysfs else list(argv)
    with in_netns(name):
        process = NetnsProcess(command, start_new_session=new_session, **popen_kwargs)
    process.netns = name
    process.own_process_group = new_session
    return process
