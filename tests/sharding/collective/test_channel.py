"""SocketStream's busy-poll receive: data that comes while it polls, after it gave up, or never."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from potluck.errors import TransferError
from potluck.sharding.collective.channel import SocketStream


def _later(seconds: float, action) -> threading.Thread:  # type: ignore[no-untyped-def]
    thread = threading.Thread(target=lambda: (time.sleep(seconds), action()), daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize(("poll_s", "delay_s"), [(0.5, 0.01), (0.01, 0.2), (0.0, 0.01)])
def test_a_polling_receive_gets_what_arrives_during_or_after_the_poll(poll_s: float, delay_s: float) -> None:
    a, b = socket.socketpair()
    reader = SocketStream(b, peer="pair", poll_s=poll_s)
    try:
        sender = _later(delay_s, lambda: a.sendall(b"hello"))
        buf = bytearray(16)
        n = reader.recv_into([memoryview(buf)], time.monotonic() + 5)
        assert buf[:n] == b"hello"[:n] and n > 0
        sender.join()
        a.sendall(b"ab")  # already there: the first non-blocking receive takes it
        views = [memoryview(bytearray(1)), memoryview(bytearray(1))]
        assert reader.recv_into(views, time.monotonic() + 5) == 2 and bytes(views[0]) + bytes(views[1]) == b"ab"
    finally:
        reader.close()
        a.close()


def test_a_peer_that_closes_while_we_poll_is_reported() -> None:
    a, b = socket.socketpair()
    reader = SocketStream(b, peer="pair", poll_s=0.5)
    try:
        closer = _later(0.01, a.close)
        with pytest.raises(TransferError, match="pair closed the connection"):
            reader.recv_into([memoryview(bytearray(4))], time.monotonic() + 5)
        closer.join()
    finally:
        reader.close()


def test_a_polling_receive_still_honours_its_deadline() -> None:
    a, b = socket.socketpair()
    reader = SocketStream(b, peer="pair", poll_s=0.05)
    try:
        with pytest.raises(TransferError, match="timed out"):
            reader.recv_into([memoryview(bytearray(4))], time.monotonic() + 0.3)
    finally:
        reader.close()
        a.close()
