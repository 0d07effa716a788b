"""A child process that holds one MQTT session for the daemon.

The daemon's loop thread holds the interpreter lock most of the time, and
paho's network thread needs it at every socket read and write: in the same
process, receiving or publishing thousands of messages a second waits on the
loop. :mod:`controller.receiver` and :mod:`controller.publisher` each run their
paho client in a child of their own, started with ``spawn`` (so the child
shares no threads or locks with the daemon), talking over one pipe.

The child's first message on the pipe is ``"ready"`` once it is connected, or
the exception that stopped it; afterwards each side uses the pipe its own way.
A child exits when the daemon closes its end of the pipe or dies.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

START_TIMEOUT_S = 30.0
# How often an idle child checks that the daemon still exists.
PARENT_CHECK_S = 0.5


class Child:
    """The daemon's end of a child process and its pipe.

    ``target(*args, conn, parent_pid)`` runs in the child; ``conn`` is its end
    of the pipe.
    """

    def __init__(
        self, target: Callable[..., None], args: tuple[Any, ...], name: str
    ) -> None:
        context = multiprocessing.get_context("spawn")
        self.conn, child_conn = context.Pipe(duplex=True)
        self.name = name
        self.process = context.Process(
            target=target,
            args=(*args, child_conn, os.getpid()),
            name=name,
            daemon=True,
        )
        self.process.start()
        child_conn.close()

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> None:
        """Block until the child is connected, or raise the error that stopped it."""
        if not self.conn.poll(timeout):
            raise RuntimeError(f"the {self.name} process did not start in {timeout} s")
        first = self.conn.recv()
        if isinstance(first, BaseException):
            raise first

    def close(self, timeout: float = 0.5) -> None:
        """Close the pipe; a child still running after ``timeout`` s is stopped."""
        self.conn.close()
        self.process.join(timeout=timeout)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(timeout=2.0)


def parent_gone(parent: int) -> bool:
    """Whether the daemon that started this child has exited."""
    return os.getppid() != parent


def report_start(conn: Connection, start: Callable[[], Any]) -> Any:
    """Run ``start`` (connecting the child's client); tell the daemon how it went.

    Returns what ``start`` returned, or None after sending its exception.
    """
    try:
        result = start()
    except Exception as error:
        conn.send(error)
        return None
    conn.send("ready")
    return result
