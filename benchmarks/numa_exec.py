"""Run a command under a process memory policy (MPOL_PREFERRED on one NUMA node), for A/B runs of host-tail
experiments.

    python3 benchmarks/numa_exec.py [--node N] -- python3 benchmarks/ttft_tail.py ...

Why: Linux's automatic NUMA balancing (/proc/sys/kernel/numa_balancing = 1) periodically unmaps a process's pages
to sample its accesses; the hinting faults that follow are taken by the process's own threads, in the kernel, and
slow every host phase for a while. The kernel scans only memory whose policy allows migration-on-fault, which a task
memory policy set with set_mempolicy(2) (without MPOL_F_NUMA_BALANCING) does not. The policy is per thread and is
inherited across fork/exec, so it is set here before exec and every thread of the command has it. `numactl
--preferred=N` does the same where numactl is installed.
"""
from __future__ import annotations

import argparse
import ctypes
import os
import platform

MPOL_PREFERRED = 1
SYS_SET_MEMPOLICY = {"x86_64": 238, "aarch64": 237}


def local_node() -> int:
    """The NUMA node of the first CPU this process may run on (0 on a one-node or non-NUMA host)."""
    cpu = min(os.sched_getaffinity(0))
    base = "/sys/devices/system/node"
    for name in sorted(os.listdir(base)) if os.path.isdir(base) else []:
        if name.startswith("node") and os.path.exists(f"{base}/{name}/cpu{cpu}"):
            return int(name[4:])
    return 0


def set_preferred(node: int) -> None:
    nr = SYS_SET_MEMPOLICY.get(platform.machine())
    if nr is None:
        raise SystemExit(f"set_mempolicy: unknown syscall number on {platform.machine()}")
    mask = ctypes.c_ulong(1 << node)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(nr, MPOL_PREFERRED, ctypes.byref(mask), ctypes.c_ulong(65)) != 0:
        raise SystemExit(f"set_mempolicy(MPOL_PREFERRED, node {node}) failed: {os.strerror(ctypes.get_errno())}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--node", type=int, default=None, help="NUMA node (default: that of the first allowed CPU)")
    ap.add_argument("cmd", nargs=argparse.REMAINDER)
    args = ap.parse_args()
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        raise SystemExit("usage: numa_exec.py [--node N] -- command [args...]")
    node = local_node() if args.node is None else args.node
    set_preferred(node)
    print(f"numa_exec: memory policy MPOL_PREFERRED node {node}; exec {' '.join(cmd)}", flush=True)
    os.execvp(cmd[0], cmd)


if __name__ == "__main__":
    main()
