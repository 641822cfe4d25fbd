"""Two overlay services asked for the same libp2p port: the second must not share it.

py-libp2p binds its listeners with SO_REUSEPORT, so without a check both hosts listened on the
port at once and the kernel split incoming connections between them."""

from __future__ import annotations

import logging
import socket

import pytest

from potluck.identity import load_or_create_identity
from potluck.overlay.host import port_in_use
from potluck.overlay.service import OverlayService
from potluck.overlay.serving import LocalServing
from potluck.routing.router import Router
from tests.e2e.procs import free_port

pytestmark = pytest.mark.timeout(60)


def service(settings) -> OverlayService:
    return OverlayService(settings, load_or_create_identity(settings.data_dir), LocalServing(Router()))


def ports(svc: OverlayService) -> set[int]:
    return {int(a.split("/tcp/")[1].split("/")[0]) for a in svc.addrs if "/tcp/" in a}


def test_port_in_use_sees_a_reuseport_listener():
    with socket.socket() as other:
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        assert port_in_use("127.0.0.1", port)
        assert port_in_use("0.0.0.0", port)
    assert not port_in_use("127.0.0.1", port)
    assert not port_in_use("127.0.0.1", 0)


async def test_second_node_on_a_taken_p2p_port_falls_back_to_a_free_one(overlay_settings, caplog):
    port = free_port()
    async with service(overlay_settings(p2p_port=port)) as a:
        assert ports(a) == {port}
        with caplog.at_level(logging.WARNING, logger="potluck.overlay.host"):
            async with service(overlay_settings(p2p_port=port)) as b:
                b_ports = ports(b)
                assert b_ports and port not in b_ports
                # The two are distinct nodes that reach each other on their own ports.
                await b.connect(next(x for x in a.addrs if "/ip4/127.0.0.1/" in x))
                assert b.admission.is_admitted(a.peer_id)
        warning = " ".join(r.getMessage() for r in caplog.records)
        assert f"127.0.0.1:{port} is already in use" in warning
        assert "--p2p-port" in warning
        assert f"free port {min(b_ports)}" in warning
