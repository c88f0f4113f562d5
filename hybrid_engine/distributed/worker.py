"""A tensor-parallel worker: `python -m hybrid_engine.distributed.worker SOCKET RANK` (started by executor.py).

It connects to the engine, receives the engine's config and the process group's address, builds its rank exactly as
the engine builds rank 0 (`runtime.rank.build_rank`), says "ready", then runs the runner calls it receives, in
order, on its serving stream, until the engine closes the pipe. Any failure is reported on the pipe and ends the
process (its collectives would no longer match rank 0's).
"""
from __future__ import annotations

import logging
import os
import pickle
import sys
import traceback
from contextlib import nullcontext
from multiprocessing.connection import Client


def main(address: str, rank: int) -> int:
    authkey = bytes.fromhex(os.environ.pop("HYBRID_ENGINE_WORKER_AUTHKEY"))
    conn = Client(address, family="AF_UNIX", authkey=authkey)
    conn.send(rank)
    try:
        cfg, init_method = conn.recv()
    except EOFError:
        return 0
    try:
        import torch

        from ..runtime.rank import build_rank, resolve_device
        from .comm import Communicator, init_group

        device = resolve_device(cfg.device, rank)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        init_group(rank, cfg.tensor_parallel_size, init_method, device)
        comm = Communicator(device)
        built = build_rank(cfg, device, (rank, cfg.tensor_parallel_size), comm, need_tokenizer=False)
        conn.send("ready")
        runner = built.runner
        scope = torch.cuda.stream(built.stream) if built.stream is not None else nullcontext()
        with scope:
            while True:
                try:
                    data = conn.recv_bytes()
                except (EOFError, OSError):
                    break  # the engine closed the pipe (shutdown) or exited
                name, args, kwargs = pickle.loads(data)
                getattr(runner, name)(*args, **kwargs)
        if device.type == "cuda":
            # The engine has synchronized its GPU, so every collective of ours has completed. Exit without the
            # interpreter's teardown (CUDA graphs, NCCL communicators, caches), which can block on a group whose
            # other members are leaving too; the driver releases the process's GPU resources.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
        from .executor import leave_group

        leave_group()
        return 0
    except BaseException as exc:  # noqa: BLE001 - report anything, then end: rank 0 fails its requests
        logging.getLogger(__name__).error("tensor-parallel worker rank %d failed:\n%s", rank, traceback.format_exc())
        try:
            conn.send(f"{type(exc).__name__}: {exc}")
        except OSError:
            pass
        return 1


if __name__ == "__main__":
    import faulthandler
    import signal

    faulthandler.register(signal.SIGUSR1)  # `kill -USR1 <pid>` prints where this worker is
    logging.basicConfig(level=os.environ.get("HYBRID_ENGINE_LOG", "WARNING"))
    sys.exit(main(sys.argv[1], int(sys.argv[2])))
