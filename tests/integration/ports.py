"""A free TCP port for a test's process group (fixed ports collide when two suites, or two tests,
run at once on one machine)."""

import socket


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
