"""Ports for local test clusters (tf.distribute workers on 127.0.0.1)."""

import socket


def free_ports(count):
    """`count` TCP ports free on 127.0.0.1 a moment ago (the workers bind them next)."""
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports
