"""The conftest network guard: non-loopback connections fail, loopback ones work."""

import socket

import pytest


@pytest.mark.parametrize("address", [("93.184.215.14", 443), ("example.com", 80), ("2606:4700::1111", 443, 0, 0)])
def test_a_non_loopback_connection_fails(address):
    family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock, pytest.raises(OSError, match="blocked in the tests"):
        sock.connect(address)
    with pytest.raises(OSError, match="blocked in the tests"):
        socket.create_connection(address[:2], timeout=1)


def test_a_loopback_connection_works():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        with socket.create_connection(server.getsockname(), timeout=5) as client:
            conn, _ = server.accept()
            client.sendall(b"ok")
            assert conn.recv(2) == b"ok"
            conn.close()
