"""Ports for tritonserver and its gateway.

A port found free is not held: anything may bind it before tritonserver does, and tritonserver binds its ports
only after it has loaded every model (seconds on the demo bundle, minutes at full size). So:
- `free_port` draws from below the kernel's ephemeral port range (the kernel hands ports from that range to every
  outgoing connection and to bind(0), so a port found there can be taken by any client within those minutes) and
  never returns a port twice in one process (`reserve` marks the ports a caller already holds);
- `is_free` checks a port the operator chose before the models load, so a taken one fails in a second;
- `taken_port` reads from tritonserver's log which port it found taken, so the launcher can draw another one for
  a port it chose itself and name the operator's flag otherwise.
"""
from __future__ import annotations

import random
import re
import socket
import threading
from pathlib import Path

LINUX_EPHEMERAL = (32768, 60999)
LOWEST = 10000                      # below it: well-known and registered service ports
_given: set[int] = set()
_lock = threading.Lock()
_TAKEN = re.compile(r"Socket '[^']*:(\d+)' already in use")


class PortTaken(OSError):
    """A listener could not bind `port` (the gateway raises it for its public ports)."""

    def __init__(self, port: int, message: str):
        super().__init__(message)
        self.port = port


def ephemeral_range() -> tuple[int, int]:
    try:
        lo, hi = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
        return lo, hi
    except (OSError, ValueError):
        return LINUX_EPHEMERAL


def is_free(port: int, address: str = "127.0.0.1") -> bool:
    """A listener could bind `port` on `address` now. SO_REUSEADDR as servers bind: a port whose last connections
    are in TIME_WAIT (a server just restarted on it) is free for a new listener."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((address, port))
        except OSError:
            return False
        return True


def reserve(*ports: int) -> None:
    """Ports this process already uses or was given: `free_port` never returns them."""
    with _lock:
        _given.update(p for p in ports if p)


def free_port(address: str = "127.0.0.1", rng: random.Random | None = None) -> int:
    """A port free on `address` now, outside the ephemeral range, not returned before in this process. Where the
    ephemeral range leaves no room below it, a port from bind(0)."""
    rng = rng or random.SystemRandom()
    top = ephemeral_range()[0]
    with _lock:
        if top - LOWEST >= 1000:
            for _ in range(200):
                port = rng.randrange(LOWEST, top)
                if port not in _given and is_free(port, address):
                    _given.add(port)
                    return port
        while True:
            with socket.socket() as s:
                s.bind((address, 0))
                port = s.getsockname()[1]
            if port not in _given:
                _given.add(port)
                return port


def taken_port(log: str) -> int | None:
    """The port tritonserver exited on because it was in use ("failed to start ... Socket 'ADDR:PORT' already in
    use"), from its log; None if it exited for another reason."""
    m = _TAKEN.search(log)
    return int(m.group(1)) if m else None


def taken_message(port: int, address: str, flag: str) -> str:
    return (f"port {port} ({flag}) on {address} is already in use: pass a free port with {flag}, or stop the "
            f"process that holds it (`ss -ltnp 'sport = :{port}'` names it)")
