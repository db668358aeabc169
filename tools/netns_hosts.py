"""Several "hosts" on one Linux machine: network namespaces joined by a bridge.

    python tools/netns_hosts.py up 3      # bprop-h0..bprop-h2, prints the hosts
    python tools/netns_hosts.py status    # what exists now
    python tools/netns_hosts.py down      # removes everything it made (idempotent)

Needs root and iproute2 (``ip``). Each host ``bprop-hK`` is a network namespace
with ``lo`` and one interface ``eth0`` at 10.213.0.(K+1)/24, the far end of a veth
pair whose near end ``bprop-vK`` sits on the bridge ``bprop-br`` in the root
namespace; the bridge holds 10.213.0.254, the launching machine's address on
that network (mpiexec runs in the root namespace). The namespaces have no
default route, so their traffic can only reach each other and the bridge:
nothing leaves the machine. IPv6 is off on these interfaces so that the byte
counters of ``bprop-vK`` (``counters``) count IPv4 traffic between the hosts
and nothing else.

A real cluster resolves host names; here ``ip netns exec`` bind-mounts
/etc/netns/bprop-hK/hosts over /etc/hosts inside the namespace, and that file
names every host and maps this machine's host name (the one mpiexec gives its
proxies to connect back to) to the bridge address.

tools/netns_launch.py is the launcher Hydra runs instead of ssh (mpiexec's
``-launcher-exec``): it enters the namespace of the host it is given.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

PREFIX = "bprop-h"  # namespace names: bprop-h0, bprop-h1, ...
BRIDGE = "bprop-br"
VETH = "bprop-v"  # root-namespace end of host K's veth pair: bprop-vK
IFACE = "eth0"  # the host's interface inside its namespace (the same name on every host)
NETWORK = ipaddress.ip_network("10.213.0.0/24")
LAUNCHER_ADDRESS = "10.213.0.254"
MAX_HOSTS = 16
NETNS_ETC = Path("/etc/netns")
LOCK = Path("/tmp/bprop-netns-hosts.lock")  # one user of the names at a time


@dataclass(frozen=True)
class Host:
    index: int

    @property
    def name(self) -> str:
        """The host name: the namespace's name and the name in the hostfile."""
        return f"{PREFIX}{self.index}"

    @property
    def address(self) -> str:
        return str(NETWORK.network_address + self.index + 1)

    @property
    def veth(self) -> str:
        """The root-namespace end of this host's link; its counters are the host's traffic."""
        return f"{VETH}{self.index}"


def host_for(name: str) -> Host:
    """The host named ``bprop-hK`` or addressed 10.213.0.(K+1); ValueError otherwise."""
    name = name.rsplit("@", 1)[-1]  # user@host, as ssh takes it
    if name.startswith(PREFIX) and name[len(PREFIX):].isdigit():
        return Host(int(name[len(PREFIX):]))
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        address = None
    if address is not None and address in NETWORK:
        index = int(address) - int(NETWORK.network_address) - 1
        if 0 <= index < MAX_HOSTS:
            return Host(index)
    raise ValueError(f"[netns_hosts] {name!r} is not a host of tools/netns_hosts.py "
                     f"({PREFIX}K or {NETWORK.network_address + 1}.. for K < {MAX_HOSTS})")


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        raise RuntimeError(f"[netns_hosts] ip {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc


def unavailable() -> str | None:
    """Why namespaces cannot be made here (a reason to skip), or None."""
    if not sys.platform.startswith("linux"):
        return f"network namespaces need Linux, this is {sys.platform}"
    if shutil.which("ip") is None:
        return "no `ip` command: install iproute2"
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    return None


def namespaces() -> list[str]:
    """The bprop-h* namespaces that exist now."""
    out = _ip("netns", "list", check=False).stdout
    names = [line.split()[0] for line in out.splitlines() if line.strip()]
    return sorted(n for n in names if n.startswith(PREFIX))


def _kill_processes(ns: str) -> None:
    pids = _ip("netns", "pids", ns, check=False).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass


def down() -> None:
    """Removes every namespace, link and hosts file this tool makes, those of a killed
    run included; kills the processes left inside the namespaces. Idempotent."""
    for ns in namespaces():
        _kill_processes(ns)
        _ip("netns", "del", ns, check=False)  # takes its end of the veth pair along
    links = _ip("-o", "link", "show", check=False).stdout
    for line in links.splitlines():
        name = line.split(":")[1].strip().split("@")[0]
        if name.startswith(VETH) or name == BRIDGE:
            _ip("link", "del", name, check=False)
    if NETNS_ETC.is_dir():
        for d in NETNS_ETC.glob(f"{PREFIX}*"):
            shutil.rmtree(d, ignore_errors=True)
    if NETNS_ETC.is_dir() and not any(NETNS_ETC.iterdir()):
        NETNS_ETC.rmdir()


def _check_free() -> None:
    # 10.213.0.0/24 must not be a network this machine already reaches: the hosts'
    # traffic would mix with it and the counters would lie. Called after down(), so
    # no route of our own bridge is left.
    routes = _ip("-4", "route", "show", "table", "all", check=False).stdout
    for line in routes.splitlines():
        words = line.split()
        # "10.0.0.0/8 dev eth0 ...", "local 10.213.0.254 dev ...", "default via ..."
        dest = words[1] if words[0] in ("local", "broadcast", "unicast", "multicast",
                                        "unreachable", "blackhole") else words[0]
        try:
            net = ipaddress.ip_network(dest, strict=False)
        except ValueError:
            continue  # "default"
        if net.overlaps(NETWORK):
            raise RuntimeError(f"[netns_hosts] {NETWORK} is already in use on this "
                               f"machine (route: {line.strip()})")


def _hosts_file(n: int) -> str:
    lines = ["127.0.0.1 localhost",
             f"{LAUNCHER_ADDRESS} {socket.gethostname()}"]  # mpiexec's name: its proxies connect back to it
    lines += [f"{Host(k).address} {Host(k).name}" for k in range(n)]
    return "\n".join(lines) + "\n"


def up(n: int) -> list[Host]:
    """Creates hosts bprop-h0..bprop-h{n-1} (after removing any left over) and waits
    until their links are up. Returns the hosts."""
    reason = unavailable()
    if reason:
        raise RuntimeError(f"[netns_hosts] {reason}")
    if not 1 <= n <= MAX_HOSTS:
        raise ValueError(f"[netns_hosts] n must lie in [1, {MAX_HOSTS}], but got {n}")
    down()
    _check_free()
    try:
        _ip("link", "add", BRIDGE, "type", "bridge")
        _write(f"/proc/sys/net/ipv6/conf/{BRIDGE}/disable_ipv6", "1")
        _ip("addr", "add", f"{LAUNCHER_ADDRESS}/{NETWORK.prefixlen}", "dev", BRIDGE)
        _ip("link", "set", BRIDGE, "up")
        hosts = [Host(k) for k in range(n)]
        for h in hosts:
            _ip("netns", "add", h.name)
            _ip("link", "add", h.veth, "type", "veth", "peer", "name", f"{h.veth}p")
            _write(f"/proc/sys/net/ipv6/conf/{h.veth}/disable_ipv6", "1")
            _ip("link", "set", f"{h.veth}p", "netns", h.name)
            _ip("-n", h.name, "link", "set", f"{h.veth}p", "name", IFACE)
            _ip("netns", "exec", h.name, "sh", "-c",
                f"echo 1 > /proc/sys/net/ipv6/conf/{IFACE}/disable_ipv6")
            _ip("-n", h.name, "addr", "add", f"{h.address}/{NETWORK.prefixlen}", "dev", IFACE)
            _ip("-n", h.name, "link", "set", "lo", "up")
            _ip("-n", h.name, "link", "set", IFACE, "up")
            _ip("link", "set", h.veth, "master", BRIDGE)
            _ip("link", "set", h.veth, "up")
            etc = NETNS_ETC / h.name
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "hosts").write_text(_hosts_file(n))
        _wait_forwarding(hosts)
    except BaseException:
        down()
        raise
    return hosts


def _write(path: str, value: str) -> None:
    try:
        Path(path).write_text(value)
    except OSError:
        pass  # no IPv6 in this kernel: nothing to turn off


def _wait_forwarding(hosts: list[Host], timeout: float = 10.0) -> None:
    # A bridge port forwards once it is up and (without STP) at once; wait for the
    # carrier of every link so that the first connection does not race it.
    deadline = time.monotonic() + timeout
    for h in hosts:
        while Path(f"/sys/class/net/{h.veth}/operstate").read_text().strip() != "up":
            if time.monotonic() > deadline:
                raise RuntimeError(f"[netns_hosts] {h.veth} did not come up in {timeout} s")
            time.sleep(0.05)


def counters(host: Host) -> dict[str, int]:
    """Bytes and packets through the host's link, read on its root-namespace end
    (rx there is what the host sent, tx what it received)."""
    stats = Path(f"/sys/class/net/{host.veth}/statistics")
    return {"sent_bytes": int((stats / "rx_bytes").read_text()),
            "received_bytes": int((stats / "tx_bytes").read_text()),
            "sent_packets": int((stats / "rx_packets").read_text()),
            "received_packets": int((stats / "tx_packets").read_text())}


def set_link(host: Host, state: str) -> None:
    """Brings the host's own interface (eth0 inside its namespace) "up" or "down": the
    host is cut off from the others, its processes keep running."""
    _ip("-n", host.name, "link", "set", IFACE, state)


def pids(host: Host) -> list[int]:
    """The processes running in the host's namespace."""
    return [int(p) for p in _ip("netns", "pids", host.name).stdout.split()]


def kill_host(host: Host) -> list[int]:
    """SIGKILLs every process in the host's namespace; returns their pids."""
    killed = pids(host)
    for pid in killed:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return killed


@contextlib.contextmanager
def hosts(n: int):
    """``with hosts(n) as hs:`` creates n hosts and always removes them. Holds a lock
    for the whole block: two test runs on one machine would share the names."""
    # POSIX only, like the rest of this tool; imported here so that the tests'
    # import of this module works everywhere and they skip cleanly
    import fcntl

    with open(LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield up(n)
        finally:
            down()


def write_hostfile(path: str | os.PathLike, hosts: list[Host], slots: int = 1) -> Path:
    """A Hydra hostfile naming the hosts, ``name:slots`` a line, as the README's."""
    path = Path(path)
    path.write_text("".join(f"{h.name}:{slots}\n" for h in hosts))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_up = sub.add_parser("up", help="create N hosts (removing any left over first)")
    p_up.add_argument("n", type=int)
    sub.add_parser("down", help="remove every host and link (idempotent)")
    sub.add_parser("status", help="list the hosts and their byte counters")
    args = parser.parse_args(argv)
    if args.cmd == "up":
        for h in up(args.n):
            print(f"{h.name} {h.address} {IFACE} (root end {h.veth})")
    elif args.cmd == "down":
        down()
    else:
        for ns in namespaces():
            h = host_for(ns)
            print(ns, h.address, counters(h) if Path(f"/sys/class/net/{h.veth}").exists()
                  else "no link")
    return 0


if __name__ == "__main__":
    sys.exit(main())
