"""The lab's command line: ``xo lab up|down|status`` (registered on the xo
command by :func:`add_lab_commands`) and ``python -m xo.lab``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

from xo.lab.build import down, down_all, lab_status, list_labs, up
from xo.lab.errors import LabError
from xo.lab.model import (
    DEFAULT_LAB_NAME,
    DEFAULT_TARGETS,
    LAB_NAME_MAX_LEN,
    MAX_TARGETS,
    format_rate,
    validate_lab_name,
)

# --------------------------------------------------------------------------- status

def _yes_no(flag: bool) -> str:
    return "[green]yes[/green]" if flag else "[red]no[/red]"


def _print_status_tables(statuses: Sequence[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    # Piped output (logs, CI) gets the full table instead of rich's 80-column default.
    console = Console(width=None if sys.stdout.isatty() else 160)
    if not statuses:
        console.print("no xo labs")
        return
    for status in statuses:
        if not status["described"] and not status["namespaces"]:
            console.print(f"lab {status['name']} does not exist")
            continue
        if not status["described"]:
            leftovers = ", ".join(status["namespaces"])
            console.print(
                f"[bold]lab {status['name']}[/bold]: [yellow]no description[/yellow] "
                f"(partial or interrupted; namespaces: {leftovers}); "
                f"remove with `xo lab down --name {status['name']}`"
            )
            continue
        table = Table(
            title=(
                f"lab {status['name']}: bridge {status['bridge_ifname']} in "
                f"{status['bridge_netns']} (exists: {_yes_no(status['bridge_netns_exists'])}), "
                f"{status['ipv4_network']}, {status['ipv6_network']}"
            ),
            title_justify="left",
        )
        table.add_column("member")
        table.add_column("netns", no_wrap=True)
        table.add_column("exists")
        table.add_column("interface (ifindex)", no_wrap=True)
        table.add_column("link")
        table.add_column("MAC", no_wrap=True)
        table.add_column("IPv4", no_wrap=True)
        table.add_column("IPv6", no_wrap=True)
        table.add_column("rate")
        table.add_column("bridge port", no_wrap=True)
        for member in status["hosts"]:
            table.add_row(
                member["name"],
                member["netns"],
                _yes_no(member["netns_exists"]),
                f"{member['ifname']} ({member['ifindex']})",
                member["link_state"],
                member["mac"],
                f"{member['ipv4']}/{member['ipv4_prefixlen']}",
                f"{member['ipv6']}/{member['ipv6_prefixlen']}",
                format_rate(member["rate_bps"]),
                member["port_ifname"],
            )
        console.print(table)


# --------------------------------------------------------------------------- CLI


def _cmd_up(args: argparse.Namespace) -> int:
    up(args.name, args.targets, args.rate, client_rate=args.client_rate, force=args.force)
    statuses = [lab_status(args.name)]
    if args.json:
        print(json.dumps({"labs": statuses}, indent=2))
    else:
        _print_status_tables(statuses)
    return 0


def _report_removed(name: str, namespaces: Sequence[str]) -> None:
    if not namespaces:
        print(f"lab {name}: nothing to remove")
    elif len(namespaces) <= 6:
        print(f"lab {name}: removed {', '.join(namespaces)}")
    else:
        print(f"lab {name}: removed {len(namespaces)} namespaces (xo-{name}-*)")


def _cmd_down(args: argparse.Namespace) -> int:
    if args.all:
        removed = down_all()
        for name, namespaces in removed.items():
            _report_removed(name, namespaces)
        if not removed:
            print("no xo labs")
        return 0
    _report_removed(args.name, down(args.name))
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    names = [args.name] if args.name else list_labs()
    statuses = [lab_status(name) for name in names]
    if args.json:
        print(json.dumps({"labs": statuses}, indent=2))
    else:
        _print_status_tables(statuses)
    if args.name and not statuses[0]["described"] and not statuses[0]["namespaces"]:
        return 1  # the lab asked for does not exist
    return 0


def _targets_argument(text: str) -> int:
    value = int(text)
    if not 1 <= value <= MAX_TARGETS:
        raise argparse.ArgumentTypeError(f"must be between 1 and {MAX_TARGETS}")
    return value


def _lab_name_argument(text: str) -> str:
    try:
        return validate_lab_name(text)
    except LabError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _add_leaf_commands(subparsers: Any) -> None:
    up_parser = subparsers.add_parser("up", help="create a lab (namespaces, bridge, links)")
    up_parser.add_argument(
        "--name",
        type=_lab_name_argument,
        default=DEFAULT_LAB_NAME,
        help=f"lab name, 1-{LAB_NAME_MAX_LEN} of [a-z0-9] (default {DEFAULT_LAB_NAME})",
    )
    up_parser.add_argument(
        "--targets",
        type=_targets_argument,
        default=DEFAULT_TARGETS,
        help=f"number of targets (default {DEFAULT_TARGETS})",
    )
    up_parser.add_argument(
        "--rate",
        default=None,
        help="rate limit on host and target links, both directions, control port first "
             "(htb; e.g. 1gbit; default unlimited)",
    )
    up_parser.add_argument(
        "--client-rate", default=None, help="rate limit on the client link (default unlimited)"
    )
    up_parser.add_argument(
        "--force", action="store_true", help="tear down an existing lab of that name first"
    )
    up_parser.add_argument("--json", action="store_true", help="print the description as JSON")
    up_parser.set_defaults(func=_cmd_up)

    down_parser = subparsers.add_parser("down", help="remove a lab (idempotent)")
    which = down_parser.add_mutually_exclusive_group()
    which.add_argument(
        "--name",
        type=_lab_name_argument,
        default=DEFAULT_LAB_NAME,
        help=f"lab name (default {DEFAULT_LAB_NAME})",
    )
    which.add_argument(
        "--all", action="store_true", help="remove every xo lab (by description or namespace name)"
    )
    down_parser.set_defaults(func=_cmd_down)

    status_parser = subparsers.add_parser("status", help="show labs and their live state")
    status_parser.add_argument(
        "--name", type=_lab_name_argument, default=None, help="one lab (default: all labs)"
    )
    status_parser.add_argument("--json", action="store_true", help="print JSON")
    status_parser.set_defaults(func=_cmd_status)


def add_lab_commands(subparsers: Any) -> Any:
    """Register `lab up|down|status` on an argparse subparsers object.

    Each leaf sets `func`: call `args.func(args)`, which returns an exit status and
    raises LabError (print its message) on failure. Returns the `lab` parser's own
    subparsers object, so callers can add more `lab` commands (e.g. `demo`).
    """
    lab_parser: argparse.ArgumentParser = subparsers.add_parser(
        "lab", help="one-machine lab of network namespaces (client, host, targets)"
    )
    leaves = lab_parser.add_subparsers(dest="lab_command", required=True)
    _add_leaf_commands(leaves)
    return leaves


_DESCRIPTION = "The one-machine lab: a client, a host (the load balancer) and N targets."


def main(argv: Sequence[str] | None = None) -> int:
    """Standalone entry point: `python -m xo.lab up|down|status ...`."""
    parser = argparse.ArgumentParser(prog="python -m xo.lab", description=_DESCRIPTION)
    _add_leaf_commands(parser.add_subparsers(dest="lab_command", required=True))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    handler: Callable[[argparse.Namespace], int] = args.func
    try:
        return handler(args)
    except LabError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        # `up` has already removed its partial lab by the time this arrives here.
        print("interrupted", file=sys.stderr)
        return 130

