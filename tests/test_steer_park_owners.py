"""Per-owner park rings (xo_park_rings, xo_park_own): processes that share one
loaded steering object (a parent and the child it forked, like nginx's
master and workers) each read the frames of their own PARK entries and no
other's. The real tc ingress and XDP programs park crafted frames
(BPF_PROG_TEST_RUN); which process's rings got them is what each one's
xo_park_collect() reads."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from test_bpf_datapath import V4, frame
from xo.steer import FlowKey, Kind, Prog, Rule, Steer, XoError, monotonic_ns

DROP = {Prog.TC_INGRESS: 2, Prog.XDP: 1}  # TC_ACT_SHOT, XDP_DROP
OWNER_CHILD, OWNER_PARENT = 0x1234500, 0x6789A00


@pytest.fixture
def steer() -> Iterator[Steer]:
    s = Steer(pin=False)
    yield s
    s.close()


def park_entry(steer: Steer, sport: int, owner: int) -> bytes:
    """A PARK entry of `owner` for a client port; a frame of that flow."""
    client, host, _ = V4
    steer.insert(FlowKey(client, sport, host, 80),
                 Rule(Kind.PARK, owner=owner, expires_ns=monotonic_ns() + 60_000_000_000))
    return frame(client, sport, host, 80)


def park(steer: Steer, prog: Prog, raw: bytes) -> None:
    verdict, _ = steer.test_run(prog, raw)
    assert verdict == DROP[prog]


@pytest.mark.parametrize("prog", [Prog.TC_INGRESS, Prog.XDP], ids=["tc", "xdp"])
def test_frames_reach_their_owner_process(steer: Steer, prog: Prog) -> None:
    child_frame = park_entry(steer, 40001, OWNER_CHILD)
    parent_frame = park_entry(steer, 40002, OWNER_PARENT)
    other_frame = park_entry(steer, 40003, 0x55500)  # an owner without a ring
    assert steer.park_owners() == []
    to_child_r, to_child_w = os.pipe()
    to_parent_r, to_parent_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its own ring, then reports what it read
        code = 1
        try:
            os.close(to_child_w)
            os.close(to_parent_r)
            steer.park_own(OWNER_CHILD)
            os.write(to_parent_w, b"r")
            assert os.read(to_child_r, 1) == b"p"
            os.write(to_parent_w, str(steer.park_collect()).encode() + b"\n")
            assert os.read(to_child_r, 1) == b"q"
            code = 0
        finally:
            os._exit(code)
    os.close(to_child_r)
    os.close(to_parent_w)
    try:
        assert os.read(to_parent_r, 1) == b"r"
        steer.park_own(OWNER_PARENT)
        assert steer.park_owners() == sorted([OWNER_CHILD, OWNER_PARENT])
        with pytest.raises(XoError):  # once per handle
            steer.park_own(OWNER_PARENT)
        for raw in (child_frame, child_frame, parent_frame, other_frame):
            park(steer, prog, raw)
        # the parent reads its own frame and the shared ring's, not the child's
        assert steer.park_collect() == 2
        os.write(to_child_w, b"p")
        assert os.read(to_parent_r, 16).strip() == b"2"
        os.write(to_child_w, b"q")
    finally:
        os.close(to_child_w)
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    # the child is gone and its ring with it from the parent's view once
    # disowned: its flows' frames go to the shared ring again
    steer.park_disown(OWNER_CHILD)
    assert steer.park_owners() == [OWNER_PARENT]
    with pytest.raises(XoError):
        steer.park_disown(OWNER_CHILD)
    park(steer, prog, child_frame)
    assert steer.park_collect() == 1
    assert steer.dp_stats()["parked"] == 5
    os.close(to_parent_r)
