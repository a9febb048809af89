"""crosvm.base.fdpass: fds received with SCM_RIGHTS."""

from __future__ import annotations

import array
import os
import socket

import pytest

from crosvm.base.fdpass import close_fds, fds_from


def test_fds_sent_with_a_message_are_received_as_new_fds():
    a, b = socket.socketpair()
    r, w = os.pipe()
    a.sendmsg([b"x"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [w]))])

    _, anc, _, _ = b.recvmsg(1, socket.CMSG_SPACE(4 * 4))
    (got,) = fds_from(anc)
    os.write(got, b"hi")

    assert got != w and os.read(r, 2) == b"hi"
    close_fds([got, r, w])
    a.close()
    b.close()


def test_no_ancillary_data_is_no_fds():
    assert fds_from([]) == []


def test_closing_an_fd_already_closed_is_not_an_error():
    r, w = os.pipe()
    os.close(r)

    close_fds([r, w])

    with pytest.raises(OSError):
        os.fstat(w)
