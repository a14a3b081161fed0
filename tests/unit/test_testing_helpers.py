"""`servable_framework.testing`: the helpers every integration test starts its processes with."""

from __future__ import annotations

import socket

from servable_framework.testing import free_port


def test_free_port_never_hands_out_the_same_port_twice() -> None:
    # a test asks for its REST, ZMQ and Distributed Worker ports before any is bound: a repeat makes one bind fail
    # (drawn at random from ~11,800 ports, 600 draws repeat one almost surely unless repeats are excluded)
    ports = [free_port() for _ in range(600)]
    assert len(set(ports)) == len(ports)


def test_free_port_is_bindable_now() -> None:
    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))  # raises if the port was taken
