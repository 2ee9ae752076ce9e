"""Hosts made of Linux network namespaces: one namespace per host, all joined by a bridge that
lives in a namespace of its own.

    namespace <prefix>-net          bridge br0 (no address), one port per host
        port "db"      ── veth ──  namespace <prefix>-db       eth0 198.18.0.10/24
        port "worker2" ── veth ──  namespace <prefix>-worker2  eth0 198.18.0.42/24
        ...
        port "client"  ── veth ──  namespace <prefix>-client   eth0 198.18.0.100/24  (the test runner)

Addresses come from 198.18.0.0/15, the range reserved for benchmarking. Every host has only
its /24 link route and no default route, so nothing can leave the bridge, and nothing is
created in the machine's own namespace: both ends of every veth are made inside namespaces.

The test runner reaches the hosts as the `client` host: `Network.enter(client)` moves the
calling thread (pytest's main thread) into the client namespace with setns(2), the syscall
`ip netns exec` uses, so `requests` and `psycopg` work unchanged, and threads started from
there inherit it. `Network.leave()` moves it back before anything is torn down.
"""
from __future__ import annotations

import ctypes
import json
import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass
from typing import Iterable, Optional

CLONE_NEWNET = 0x40000000
SUBNET_PREFIX_LENGTH = 24
BRIDGE = "br0"
# Namespaces are named rqmh<pid>-<host>: the pid says which pytest made them, so a run killed
# before its finalizers (SIGKILL, a power cut) is recognised and cleared by the next run.
NAME_PREFIX = "rqmh"
_OWNED = re.compile(r"^%s(\d+)-" % NAME_PREFIX)

_libc = ctypes.CDLL("libc.so.6", use_errno=True)


def run(*argv: str) -> str:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise NetworkError("`%s` failed (%d): %s" % (" ".join(argv), result.returncode, result.stderr.strip()))
    return result.stdout


class NetworkError(AssertionError):
    """A namespace, link or address could not be made: the multi-host test fails with the reason."""


@dataclass(frozen=True)
class Host:
    name: str  # also the hostname inside the host, and the name of its port on the bridge
    address: str
    namespace: str


class Network:
    def __init__(self, host_addresses: dict[str, str], owner_pid: Optional[int] = None):
        self.prefix = "%s%d" % (NAME_PREFIX, owner_pid or os.getpid())
        self.bridge_namespace = self.prefix + "-net"
        self.hosts = {name: Host(name, address, "%s-%s" % (self.prefix, name))
                      for name, address in host_addresses.items()}
        self._root_namespace_fd: Optional[int] = None
        self._created: list[str] = []

    @property
    def created(self) -> list[str]:
        return list(self._created)

    # -- building ------------------------------------------------------------------------------

    def build(self) -> "Network":
        remove_abandoned_namespaces()
        self._add_namespace(self.bridge_namespace)
        run("ip", "-n", self.bridge_namespace, "link", "add", BRIDGE, "type", "bridge")
        run("ip", "-n", self.bridge_namespace, "link", "set", BRIDGE, "up")
        for host in self.hosts.values():
            self._add_namespace(host.namespace)
            run("ip", "-n", host.namespace, "link", "set", "lo", "up")
            # Created inside the bridge's namespace with its peer born in the host's: neither end
            # ever exists in the machine's own namespace.
            run("ip", "-n", self.bridge_namespace, "link", "add", host.name, "type", "veth",
                "peer", "name", "eth0", "netns", host.namespace)
            run("ip", "-n", self.bridge_namespace, "link", "set", host.name, "master", BRIDGE, "up")
            run("ip", "-n", host.namespace, "addr", "add", "%s/%d" % (host.address, SUBNET_PREFIX_LENGTH), "dev", "eth0")
            run("ip", "-n", host.namespace, "link", "set", "eth0", "up")
        self.check_isolated()
        return self

    def _add_namespace(self, name: str) -> None:
        try:
            run("ip", "netns", "add", name)
        except NetworkError as error:
            raise NetworkError("cannot create network namespaces (the multi-host test needs root and "
                               "`ip netns`): %s" % error) from None
        self._created.append(name)

    def check_isolated(self) -> None:
        """Every host routes only its own /24 on its own eth0: no default route, no way out."""
        for host in self.hosts.values():
            routes = json.loads(run("ip", "-n", host.namespace, "-j", "route", "show", "table", "all"))
            beyond = [route for route in routes if route.get("type", "unicast") == "unicast"
                      and route["dst"] not in ("198.18.0.0/%d" % SUBNET_PREFIX_LENGTH, host.address)
                      and not route["dst"].startswith(("127.", "fe80::", "ff00::", "::1"))]
            if beyond:
                raise NetworkError("host %s has routes beyond its subnet: %s" % (host.name, beyond))

    # -- faults --------------------------------------------------------------------------------

    def cut(self, host: str) -> None:
        """Unplug the host: its bridge port goes down (and with it the carrier of its eth0)."""
        run("ip", "-n", self.bridge_namespace, "link", "set", host, "down")

    def reconnect(self, host: str) -> None:
        run("ip", "-n", self.bridge_namespace, "link", "set", host, "up")

    # -- the test runner's own host ------------------------------------------------------------

    def enter(self, host: str) -> None:
        """Move the calling thread into `host`'s namespace (see the module docstring)."""
        if self._root_namespace_fd is None:
            self._root_namespace_fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        _setns_path("/run/netns/" + self.hosts[host].namespace)

    def leave(self) -> None:
        if self._root_namespace_fd is not None:
            _setns_fd(self._root_namespace_fd)
            os.close(self._root_namespace_fd)
            self._root_namespace_fd = None

    # -- teardown ------------------------------------------------------------------------------

    def destroy(self) -> None:
        """Kill whatever still runs in the namespaces, then delete them; the veths and the bridge go
        with the namespaces that hold them. Safe to call twice and after a half-finished build."""
        self.leave()
        for namespace in reversed(self._created):
            kill_everything_in([namespace], grace_seconds=0)
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True, timeout=30)
        self._created.clear()
        left = [name for name in namespace_names() if name.startswith(self.prefix + "-")]
        if left:
            raise NetworkError("namespaces left after teardown: %s" % left)


def _setns_path(path: str) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        _setns_fd(descriptor)
    finally:
        os.close(descriptor)


def _setns_fd(descriptor: int) -> None:
    if _libc.setns(descriptor, CLONE_NEWNET) != 0:
        error = ctypes.get_errno()
        raise NetworkError("setns failed: %s" % os.strerror(error))


def namespace_names() -> list[str]:
    output = subprocess.run(["ip", "-j", "netns", "list"], capture_output=True, text=True, timeout=30).stdout
    return [entry["name"] for entry in json.loads(output or "[]")]


def pids_in(namespace: str) -> list[int]:
    result = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True, timeout=30)
    # Never ourselves: pytest's main thread may still sit in the client namespace.
    return [int(pid) for pid in result.stdout.split() if int(pid) != os.getpid()]


def signal_all(pids: Iterable[int], signum: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


def kill_everything_in(namespaces: Iterable[str], grace_seconds: float) -> None:
    """SIGTERM every process of the namespaces at once, give them `grace_seconds` to end, then
    SIGKILL the rest, and return when none is left."""
    namespaces = list(namespaces)
    if grace_seconds:
        for namespace in namespaces:
            signal_all(pids_in(namespace), signal.SIGTERM)
        deadline = time.monotonic() + grace_seconds
        while any(pids_in(namespace) for namespace in namespaces) and time.monotonic() < deadline:
            time.sleep(0.1)
    deadline = time.monotonic() + 15
    for namespace in namespaces:
        while pids := pids_in(namespace):
            if time.monotonic() > deadline:
                raise NetworkError("processes %s in %s survived SIGKILL" % (pids, namespace))
            signal_all(pids, signal.SIGKILL)
            time.sleep(0.05)


def abandoned(name: str) -> bool:
    """Whether `name` (a namespace, a directory) was made by a run whose pytest is gone."""
    owner = _OWNED.match(name)
    if owner is None:
        return False
    try:
        os.kill(int(owner.group(1)), 0)
    except ProcessLookupError:
        return True
    return False


def remove_abandoned_namespaces() -> None:
    """Namespaces of a run killed before its finalizers ran, and whatever still runs in them."""
    for name in namespace_names():
        if abandoned(name):
            kill_everything_in([name], grace_seconds=0)
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)
