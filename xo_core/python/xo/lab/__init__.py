"""The one-machine lab: a client, a host (the load balancer) and N targets.

Every member of the lab is a network namespace with one veth into a Linux bridge that
lives in a namespace of its own. Nothing is ever created in the root namespace: the
bridge-side veth end is created in the bridge namespace and its peer is created directly
inside the member's namespace, so a crash half-way through never leaves links behind in
the root namespace, and deleting the lab's namespaces deletes every link.

    with lab("demo", targets=2, rate="1gbit") as testbed:
        with in_netns(testbed.host.netns):
            sock = socket.create_connection((testbed.targets[0].ipv4, 8080))

The package, by job (everything is importable from ``xo.lab`` itself):

- ``xo.lab.namespaces``: network namespaces and links, the one place they are made
  (also for tests and benchmarks that need namespaces but no lab); running code and
  processes inside a namespace;
- ``xo.lab.model``: names, addresses, rates, and the description (``Lab``,
  ``LabHost``) saved as JSON;
- ``xo.lab.build``: ``up``, ``down``, the ``lab()`` context manager, status, the XDP
  preparation of a bridge port;
- ``xo.lab.cli``: ``xo lab up|down|status`` and ``python -m xo.lab``.

See docs/lab.md for the topology, the naming scheme and the addresses.
"""

from __future__ import annotations

from xo.lab.build import (
    PORT_CSUM_FEATURE,
    MemberState,
    down,
    down_all,
    lab,
    lab_in_use,
    lab_status,
    list_labs,
    prepare_xdp_tx,
    up,
)
from xo.lab.cli import add_lab_commands, main
from xo.lab.errors import LabError, LabExistsError, LabNotFoundError
from xo.lab.model import (
    BRIDGE_SYSCTLS,
    BULK_CLASS,
    CLIENT_HOST_ID,
    CONTROL_CLASS,
    CONTROL_PORTS,
    DEFAULT_LAB_NAME,
    DEFAULT_TARGETS,
    FIRST_TARGET_HOST_ID,
    IPV4_NETWORK,
    IPV6_NETWORK,
    LAB_FORMAT_VERSION,
    LAB_NAME_MAX_LEN,
    LAB_NAME_RE,
    LAB_NETNS_RE,
    LAB_STATE_DIR,
    LB_HOST_ID,
    MAC_PREFIX,
    MAX_TARGETS,
    MEMBER_SYSCTLS,
    MIN_RATE_BPS,
    PIN_ROOT,
    READY_TIMEOUT_SECONDS,
    TBF_BURST_SECONDS,
    TBF_MAX_BYTES_PER_SECOND,
    TBF_MIN_BURST_BYTES,
    TBF_QUEUE_SECONDS,
    Lab,
    LabHost,
    TbfShape,
    bridge_ifname,
    bridge_netns,
    format_rate,
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
    NetnsProcess,
    add_addresses,
    add_bridge,
    add_veth,
    create_netns,
    in_netns,
    link_info,
    move_link,
    netns_exists,
    popen,
    remove_netns,
    run,
    scoped_namespaces,
    set_master,
    set_up,
)

__all__ = [
    "BRIDGE_SYSCTLS", "CLIENT_HOST_ID", "DEFAULT_LAB_NAME", "DEFAULT_TARGETS",
    "FIRST_TARGET_HOST_ID", "IPV4_NETWORK", "IPV6_NETWORK", "LAB_FORMAT_VERSION",
    "LAB_NAME_MAX_LEN", "LAB_NAME_RE", "LAB_NETNS_RE", "LAB_STATE_DIR", "LB_HOST_ID",
    "MAC_PREFIX", "MAX_TARGETS", "MEMBER_SYSCTLS", "MIN_RATE_BPS", "NETNS_DIR", "PIN_ROOT",
    "PORT_CSUM_FEATURE", "READY_TIMEOUT_SECONDS", "TBF_BURST_SECONDS",
    "TBF_MAX_BYTES_PER_SECOND", "TBF_MIN_BURST_BYTES", "TBF_QUEUE_SECONDS", "Lab",
    "LabError", "LabExistsError", "LabHost", "LabNotFoundError", "MemberState",
    "BULK_CLASS", "CONTROL_CLASS", "CONTROL_PORTS", "NetnsProcess", "TbfShape",
    "add_addresses", "add_bridge", "add_lab_commands",
    "add_veth", "bridge_ifname", "bridge_netns", "create_netns", "down", "down_all",
    "format_rate", "in_netns", "lab", "lab_in_use", "lab_state_path", "lab_status",
    "link_info", "list_labs", "main", "member_ifname", "member_netns", "move_link",
    "netns_exists", "scoped_namespaces", "parse_rate", "popen", "port_ifname", "prepare_xdp_tx",
    "remove_netns", "run", "set_master", "set_up", "target_member_name", "up", "validate_lab_name",
]
