#!/usr/bin/env python3
"""The launcher Hydra runs instead of ssh to reach a host of tools/netns_hosts.py.

    mpiexec -launcher-exec tools/netns_launch.py -f hosts -n 2 python -m mpi4py train.py

Hydra's ssh launcher (src/pm/hydra/lib/tools/bootstrap/external/
external_common_launch.c in MPICH) runs, for every host that is not the local
one,

    <launcher> -x [$HYDRA_LAUNCHER_EXTRA_ARGS] [user@]host "<hydra_pmi_proxy>" <args...> <proxy id>

with the proxy's path in literal double quotes, since ssh hands the words to the
remote user's shell. This program does what ssh and the remote shell would: it
skips ssh's options, maps the host (``bprop-hK`` or its address) to its network
namespace and runs the words joined as one ``sh -c`` command line inside it,
through ``ip netns exec`` (which also bind-mounts /etc/netns/bprop-hK/hosts as
the host's /etc/hosts). It replaces itself with that command, so Hydra's signals
and the exit status reach the proxy as they would through ssh.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from netns_hosts import host_for

# ssh options that take a value (ssh(1)); any other option is a flag.
SSH_OPTIONS_WITH_VALUE = set("BbcDEeFIiJLlmOoPpQRSWw")


def split_ssh_args(argv: list[str]) -> tuple[str, list[str]]:
    """(host, remote command words) from ssh's command line."""
    i = 0
    while i < len(argv) and argv[i].startswith("-") and argv[i] != "--":
        opt = argv[i]
        # -p 22 takes the next word, -p22 carries its value
        i += 2 if len(opt) == 2 and opt[1] in SSH_OPTIONS_WITH_VALUE else 1
    if i < len(argv) and argv[i] == "--":
        i += 1
    if i >= len(argv) - 1:
        raise SystemExit(f"netns_launch: expected [options] host command..., got {argv}")
    return argv[i], argv[i + 1:]


def main(argv: list[str]) -> None:
    host, words = split_ssh_args(argv)
    try:
        ns = host_for(host).name
    except ValueError as e:
        raise SystemExit(f"netns_launch: {e}") from None
    os.execvp("ip", ["ip", "netns", "exec", ns, "sh", "-c", " ".join(words)])


if __name__ == "__main__":
    main(sys.argv[1:])
