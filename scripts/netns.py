"""Separate hosts on one machine: Linux network namespaces on a private bridge, rate-limited links.

No Flower here: this module only builds, changes, measures and removes a small network.

- One namespace per host, plus one for the switch: a bridge that every host's veth cable plugs
  into. Nothing is added to the machine's own namespace, so no traffic can leave the machine.
- A link's rate is a `tbf` qdisc on both ends of the host's veth pair (egress on each side: the
  host's end limits its uploads, the switch's end its downloads). `netem` is not needed.
- Cutting a link sets the switch's end down: the host keeps its address, its packets go nowhere,
  as when a cable is pulled out of a switch.
- Byte counters are the kernel's counters of the host's end of its veth (`ip -s link`).
- `inside(host)` moves the *calling thread* into a host's namespace (setns(2) acts per thread),
  so sockets it opens and processes it starts live on that host; it moves back on exit.

Every name starts with a per-invocation prefix (from the PID), so parallel runs never collide,
and everything is deleted by its own name at the end, also after a failure.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

_CLONE_NEWNET = 0x40000000
SUBNET = "10.77.0"  # a /24 inside our own namespaces only: it cannot clash with the machine's


@dataclass(frozen=True)
class Host:
    """One machine of the emulated network: a name, its last address byte, its link rate."""

    name: str
    address: int  # the last byte of its IP address on the private /24
    rate_mbit: float | None  # None: no rate limit


@dataclass(frozen=True)
class Counters:
    rx_bytes: int  # into the host (downloads)
    tx_bytes: int  # out of the host (uploads)

    def __sub__(self, other: Counters) -> Counters:
        return Counters(self.rx_bytes - other.rx_bytes, self.tx_bytes - other.tx_bytes)


def unavailable_reason() -> str | None:
    """Why namespaces cannot be made here (not root, no `ip`/`tc`, kernel refuses); None if they can."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` (iproute2) is not installed"
    probe = f"fe{os.getpid()}-probe"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "delete", probe], capture_output=True)
    return None


@dataclass
class Network:
    """A switch and hosts, each host in its own namespace; a context manager that removes it all.

    Host `i` is `{prefix}-{name}`; its cable is the veth pair `{prefix}h{i}` (in the host) and
    `{prefix}b{i}` (in the switch namespace `{prefix}-sw`, on the bridge `{prefix}br`).
    """

    hosts: list[Host]
    prefix: str = field(default_factory=lambda: f"fe{os.getpid()}")
    _made_namespaces: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        names = [h.name for h in self.hosts]
        if len(set(names)) != len(names):
            raise ValueError(f"host names must be unique: {names}")
        if len(f"{self.prefix}b{len(self.hosts)}") > 15:
            raise ValueError(f"prefix {self.prefix!r} too long for interface names (15 characters)")

    def __enter__(self) -> Network:
        try:
            self.create()
        except BaseException:
            self.delete()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.delete()

    # -- names -------------------------------------------------------------------------------
    @property
    def switch(self) -> str:
        return f"{self.prefix}-sw"

    def namespace(self, host: str) -> str:
        return f"{self.prefix}-{host}"

    def host_dev(self, host: str) -> str:
        return f"{self.prefix}h{self._index(host)}"

    def switch_dev(self, host: str) -> str:
        return f"{self.prefix}b{self._index(host)}"

    def ip(self, host: str) -> str:
        return f"{SUBNET}.{self._host(host).address}"

    # -- life cycle --------------------------------------------------------------------------
    def create(self) -> None:
        bridge = f"{self.prefix}br"
        self._add_namespace(self.switch)
        _run("ip", "-n", self.switch, "link", "add", bridge, "type", "bridge")
        _run("ip", "-n", self.switch, "link", "set", bridge, "up")
        for host in self.hosts:
            ns, dev, peer = self.namespace(host.name), self.host_dev(host.name), self.switch_dev(host.name)
            self._add_namespace(ns)
            # Created inside the host's namespace and the peer moved out: nothing ever sits in
            # the machine's own namespace, even for a moment.
            _run("ip", "-n", ns, "link", "add", dev, "type", "veth", "peer", "name", peer, "netns", self.switch)
            _run("ip", "-n", self.switch, "link", "set", peer, "master", bridge)
            _run("ip", "-n", self.switch, "link", "set", peer, "up")
            _run("ip", "-n", ns, "addr", "add", f"{self.ip(host.name)}/24", "dev", dev)
            _run("ip", "-n", ns, "link", "set", dev, "up")
            _run("ip", "-n", ns, "link", "set", "lo", "up")
            if host.rate_mbit is not None:
                self.set_rate(host.name, host.rate_mbit)

    def delete(self) -> None:
        """Delete every namespace this network made (their veths go with them), by name."""
        with self._lock:
            for ns in reversed(self._made_namespaces):
                subprocess.run(["ip", "netns", "delete", ns], capture_output=True)
            self._made_namespaces.clear()

    def _add_namespace(self, ns: str) -> None:
        _run("ip", "netns", "add", ns)
        with self._lock:
            self._made_namespaces.append(ns)

    # -- changes during a run ----------------------------------------------------------------
    def set_rate(self, host: str, rate_mbit: float) -> None:
        """Limit the host's link to `rate_mbit` in each direction (replaces any earlier limit)."""
        rate_bytes = rate_mbit * 1e6 / 8
        # tbf's bucket must hold at least one timer tick of traffic and one GSO super-packet.
        burst = max(int(rate_bytes / 100), 64 * 1024)
        spec = ["tbf", "rate", f"{rate_mbit}mbit", "burst", str(burst), "latency", "400ms"]
        _run("tc", "-n", self.namespace(host), "qdisc", "replace", "dev", self.host_dev(host), "root", *spec)
        _run("tc", "-n", self.switch, "qdisc", "replace", "dev", self.switch_dev(host), "root", *spec)

    def set_link(self, host: str, up: bool) -> None:
        """Plug the host's cable into the switch, or pull it out."""
        _run("ip", "-n", self.switch, "link", "set", self.switch_dev(host), "up" if up else "down")

    def counters(self, host: str) -> Counters:
        """Bytes the kernel counted through the host's end of its cable so far."""
        out = _run("ip", "-n", self.namespace(host), "-j", "-s", "link", "show", "dev", self.host_dev(host))
        stats = json.loads(out)[0]["stats64"]
        return Counters(int(stats["rx"]["bytes"]), int(stats["tx"]["bytes"]))

    @contextmanager
    def inside(self, host: str) -> Iterator[None]:
        """Run the calling thread in the host's namespace (its sockets, the processes it starts):
        setns(2) into it, and back afterwards."""
        ns = self.namespace(host)
        libc = ctypes.CDLL(None, use_errno=True)
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        target = os.open(f"/run/netns/{ns}", os.O_RDONLY)
        try:
            if libc.setns(target, _CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), f"setns into {ns} failed")
            try:
                yield
            finally:
                if libc.setns(own, _CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns back to this thread's namespace failed")
        finally:
            os.close(target)
            os.close(own)

    def _host(self, name: str) -> Host:
        for host in self.hosts:
            if host.name == name:
                return host
        raise KeyError(f"no host {name!r} in this network ({[h.name for h in self.hosts]})")

    def _index(self, name: str) -> int:
        return self.hosts.index(self._host(name))


def _run(*command: str) -> str:
    """`ip ...` or `tc ...`; its output, or a RuntimeError with its error."""
    out = subprocess.run(command, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"`{' '.join(command)}` failed: {out.stderr.strip()}")
    return out.stdout
