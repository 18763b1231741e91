"""The ``fullkernel`` marker: tests that need kernel parts this machine lacks
(tc-flower, act_pedit, act_gact, kTLS) run inside the full-kernel lane.

On the host, each marked test is replaced by a stand-in that reports the
result of the real test run in the guest. The first stand-in to run boots
the lane once (tests/vmlane.py) and runs every selected marked test in one
pytest process there; the others only look up their result. Inside the
guest (``XO_VMLANE_GUEST=1``) marked tests run directly and their outcomes
are written to the JSON file named by ``XO_VMLANE_REPORT``.

A stand-in is skipped, with the reason, only when QEMU cannot start at all.
"""

from __future__ import annotations

import json
import os
import shlex
import time
from pathlib import Path
from typing import Any

import pytest
import vmlane
from netns_tools import FAMILIES

MARK = "fullkernel"
IN_GUEST = os.environ.get("XO_VMLANE_GUEST") == "1"
REPORT_ENV = "XO_VMLANE_REPORT"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{MARK}: needs Debian's full kernel (tc-flower, pedit, gact, kTLS); runs "
        "inside the QEMU lane of ci/vmlane.sh, the host reports the guest's result")


# ---- inside the guest: record outcomes -----------------------------------------------

_guest_results: dict[str, dict[str, Any]] = {}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if not (IN_GUEST and os.environ.get(REPORT_ENV)):
        return
    rec = _guest_results.setdefault(report.nodeid,
                                    {"outcome": "passed", "text": "", "duration": 0.0})
    rec["duration"] += report.duration
    if report.failed:
        rec["outcome"] = "failed"
        rec["text"] += f"--- {report.when} ---\n{report.longreprtext}\n"
    elif report.skipped and rec["outcome"] == "passed":
        rec["outcome"] = "skipped"
        longrepr = report.longrepr
        rec["text"] = str(longrepr[2]) if isinstance(longrepr, tuple) else str(longrepr)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    path = os.environ.get(REPORT_ENV)
    if IN_GUEST and path:
        tmp = Path(path + ".tmp")
        tmp.write_text(json.dumps(_guest_results))
        tmp.replace(path)


# ---- on the host: stand-ins that report the guest's results ---------------------------


class Lane:
    """One boot of the lane for the whole session, done on first demand."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.ran = False
        self.results: dict[str, dict[str, Any]] = {}
        self.unavailable: str | None = None
        self.error: str | None = None
        self.console_tail = ""
        self.seconds = 0.0
        self.guest_rc: int | None = None

    def run(self, nodeids: list[str]) -> None:
        self.ran = True
        report = vmlane.PROJECT / ".cache" / "vmlane" / f"report-{os.getpid()}.json"
        report.parent.mkdir(parents=True, exist_ok=True)
        report.unlink(missing_ok=True)
        rel = report.relative_to(vmlane.PROJECT)
        cmd = (f"{REPORT_ENV}={shlex.quote(str(rel))} .venv/bin/python -m pytest -q "
               f"-p no:cacheprovider -m {MARK} {shlex.join(nodeids)}")
        timeout = float(os.environ.get("XO_VMLANE_TIMEOUT", vmlane.DEFAULT_TIMEOUT))
        t0 = time.monotonic()
        try:
            res = vmlane.run_in_guest(cmd, timeout=timeout, echo=False)
        except vmlane.LaneUnavailable as exc:
            self.unavailable = str(exc)
            return
        except (vmlane.LaneError, OSError) as exc:
            self.error = str(exc)
            return
        finally:
            self.seconds = time.monotonic() - t0
        self.guest_rc = res.returncode
        self.console_tail = "\n".join(res.console.splitlines()[-60:])
        log = report.parent / "last-console.log"
        log.write_text(res.console)
        try:
            self.results = json.loads(report.read_text())
        except (OSError, ValueError) as exc:
            self.error = (f"the guest's pytest left no report ({exc}); exit status "
                          f"{res.returncode}; console ({log}) tail:\n{self.console_tail}")
        finally:
            report.unlink(missing_ok=True)


class LaneItem(pytest.Item):
    """Stands in on the host for one fullkernel test run in the guest."""

    def __init__(self, *, lane: Lane, **kw: Any) -> None:
        super().__init__(**kw)
        self.lane = lane

    def runtest(self) -> None:
        lane = self.lane
        if not lane.ran:
            ids = [i.nodeid for i in self.session.items if isinstance(i, LaneItem)]
            lane.run(ids)
        if lane.unavailable:
            pytest.skip(f"full-kernel lane unavailable: {lane.unavailable}")
        if lane.error:
            pytest.fail(f"full-kernel lane: {lane.error}", pytrace=False)
        rec = lane.results.get(self.nodeid)
        if rec is None:
            pytest.fail(f"not run in the guest (exit status {lane.guest_rc}); console "
                        f"tail:\n{lane.console_tail}", pytrace=False)
        if rec["outcome"] == "failed":
            pytest.fail(f"in the full-kernel lane:\n{rec['text']}", pytrace=False)
        if rec["outcome"] == "skipped":
            pytest.skip(f"in the full-kernel lane: {rec['text']}")

    def reportinfo(self) -> tuple[Path, int | None, str]:
        return self.path, None, f"{self.name} [full-kernel lane]"


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config,
                                  items: list[pytest.Item]) -> None:
    if IN_GUEST:
        return
    lane: Lane | None = None
    for n, item in enumerate(items):
        if item.get_closest_marker(MARK) is None:
            continue
        lane = lane or Lane(config)
        stand_in = LaneItem.from_parent(item.parent, name=item.name, lane=lane)
        stand_in.own_markers.extend(item.own_markers)  # -m still selects it
        items[n] = stand_in
    if lane is not None:
        config.stash[_LANE] = lane


_LANE = pytest.StashKey[Lane]()


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int,
                            config: pytest.Config) -> None:
    lane = config.stash.get(_LANE, None)
    if lane is None or not lane.ran:
        return
    if lane.unavailable:
        terminalreporter.write_line(f"full-kernel lane: unavailable: {lane.unavailable}")
        return
    outcomes = [r["outcome"] for r in lane.results.values()]
    terminalreporter.write_line(
        f"full-kernel lane: {len(outcomes)} tests in the guest "
        f"({outcomes.count('passed')} passed, {outcomes.count('failed')} failed, "
        f"{outcomes.count('skipped')} skipped), boot + run {lane.seconds:.1f} s")


@pytest.fixture(params=list(FAMILIES), ids=list(FAMILIES))
def family(request: pytest.FixtureRequest) -> int:
    """Each test that takes it runs for IPv4 and for IPv6."""
    return FAMILIES[request.param]
