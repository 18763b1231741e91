"""Running one of XO's long-lived asyncio programs (the reference app, the Ceph
front and agents) the way their launchers expect: "READY" on stdout once it
serves, SIGTERM/SIGINT end it cleanly (its tasks are cancelled, its finally
blocks run), and an error it cannot go on after is logged and becomes exit
code 1."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable, Coroutine
from typing import Any

log = logging.getLogger("xo.daemon")


async def run_until_signalled(run: Callable[[asyncio.Event], Coroutine[Any, Any, None]],
                              what: str,
                              fatal: tuple[type[BaseException], ...] = ()) -> int:
    """Run ``run(ready)`` until it returns or a signal arrives. Prints READY
    once ``ready`` is set. Exceptions of the ``fatal`` types are logged as
    "<what> stopped: ..." and give 1; any other propagates."""
    ready = asyncio.Event()
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(run(ready))
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, task.cancel)

    async def announce() -> None:
        await ready.wait()
        print("READY", flush=True)

    announcer = asyncio.ensure_future(announce())
    try:
        await task
    except asyncio.CancelledError:
        return 0
    except fatal as exc:
        log.error("%s stopped: %s", what, exc)
        return 1
    finally:
        announcer.cancel()
    return 0


def run_event_loop(main: Coroutine[Any, Any, int]) -> int:
    """Run a program's main coroutine on libuv's event loop (uvloop: about half
    the per-message overhead of asyncio's own) when it is installed, else on
    asyncio's."""
    try:
        import uvloop
    except ImportError:
        return int(asyncio.run(main))
    return int(uvloop.run(main))
