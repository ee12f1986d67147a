"""Forking one worker, and what the spawners share: signalling a worker's
process group, reaping it, receiving its socket.  Used by both spawners
(``prefork._spawn``) and by the fork server's own process (``prefork._fork_server``).
"""

from __future__ import annotations

import array
import atexit
import os
import signal
import socket
from typing import Any, Final

from prefork import _scoreboard
from prefork._task import WorkerInfo
from prefork._worker import ForkedChild, WorkerContext, leave, prepare, run_worker

#: signals that stop a process; blocked around a fork and in the fork server
STOP_SIGNALS: Final = frozenset({signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT})


def fork_worker(ctx: WorkerContext, slot: int, serial: int) -> tuple[int, socket.socket]:
    """Fork one worker; returns its pid and the supervisor's end of its socket."""
    parent_sock, child_sock = ctx.transport.socketpair()
    info = WorkerInfo(slot=slot, name=ctx.name, serial=serial)
    ctx.hook.prefork_before_fork(worker=info)
    ctx.scoreboard.reset(slot, pid=-1)
    me = os.getpid()
    # Until the child has reset its handlers, a stop signal must wait (pending), not run the
    # parent's handler in the child or be lost: block it around the fork; prepare() unblocks.
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        pid = os.fork()
    except BaseException:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        raise
    if pid:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
    if pid == 0:
        parent_sock.close()
        if ctx.return_in_child:
            handle = prepare(ctx, info, child_sock, me)
            if isinstance(handle, int):
                os._exit(handle)
            atexit.register(leave, ctx, info, "the child's code ended")
            raise ForkedChild(handle)
        run_worker(ctx, info, child_sock, me)
    child_sock.close()
    info.pid = pid
    ctx.scoreboard.words[slot * _scoreboard.WORDS + _scoreboard.PID] = pid
    ctx.hook.prefork_after_fork(worker=info)
    return pid, parent_sock


def recv_fds(sock: socket.socket) -> tuple[bytes, list[int], int, Any]:
    """``socket.recv_fds`` with the descriptors close-on-exec from the start, so that no
    program a thread of this process runs meanwhile inherits a worker's socket
    (``socket.recv_fds`` drops its ``flags`` argument before Python 3.12).

    A server that left with a message of ours unread (a "gone" crossing its leaving)
    makes one read fail with ECONNRESET *before* the messages it sent are read: the
    next read returns them, then end of stream."""
    fds = array.array("i")
    data, ancdata, flags, addr = sock.recvmsg(65536, socket.CMSG_LEN(fds.itemsize), socket.MSG_CMSG_CLOEXEC)
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    return data, list(fds), flags, addr


def signal_group(pid: int, sig: int, group: bool = True) -> None:
    """``sig`` to the worker's process group (what its tasks started too), or to it alone."""
    if group:
        try:
            os.killpg(pid, sig)
            return
        except (ProcessLookupError, PermissionError):
            pass
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def reap_worker(pid: int) -> int:
    """Reap an exited worker after killing what is left of its process group.

    While the worker is a zombie its pid cannot be reused, so the group kill
    reaches only what its tasks started and left behind: no orphan survives it.
    """
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    return os.waitpid(pid, 0)[1]


