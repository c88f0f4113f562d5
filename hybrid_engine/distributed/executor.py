"""The front end's side of tensor parallelism: worker processes for ranks 1..N-1, and the runner the engine drives.

The engine process is rank 0 (as vLLM's driver worker): it keeps the scheduler, its own shard and the token reader.
Every runner call that changes device state (`BROADCAST`) is pickled once and sent to every worker over its pipe
before rank 0 runs it, so all ranks enqueue the same steps in the same order; their collectives meet on the GPUs.
Workers reply only at load (ready) and when they fail. A worker that exits or fails makes `check` raise
`WorkerDiedError`: the engine fails its requests and accepts no more (rank 0 polls for it while it waits on the
GPU, which would otherwise wait forever inside a collective with a dead peer).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import pickle
import secrets
import socket
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection, Listener
from typing import Any

import torch

from ..config import EngineConfig
from ..errors import HybridEngineError
from .comm import PEER_TIMEOUT_S, Communicator, init_group, set_safe_env

logger = logging.getLogger(__name__)

# runner methods that change device state: sent to every rank, in call order
BROADCAST = ("prefill", "prefill_from", "prefill_chunk", "prefill_batch", "decode", "decode_forward", "move_row",
             "reset_rows")
READY_TIMEOUT_S = 1800.0  # load + warm-up + captures of a 70B shard
SHUTDOWN_WAIT_S = 30.0


class WorkerDiedError(HybridEngineError):
    """A tensor-parallel worker process exited or failed; the engine has stopped serving."""


class TensorParallelExecutor:
    """Starts ranks 1..N-1 (`python -m hybrid_engine.distributed.worker`), joins the process group as rank 0 and
    makes the communicator. `runner(local)` wraps rank 0's ModelRunner."""

    def __init__(self, cfg: EngineConfig, device: torch.device) -> None:
        self.world_size = cfg.tensor_parallel_size
        if device.type == "cuda" and torch.cuda.device_count() < self.world_size:
            raise ValueError(f"tensor_parallel_size={self.world_size} needs {self.world_size} GPUs; "
                             f"{torch.cuda.device_count()} visible")
        set_safe_env()
        self.device = device
        self.error: WorkerDiedError | None = None
        self.comm: Communicator | None = None
        self.procs: list[subprocess.Popen] = []
        self.conns: list[Connection] = []
        port = _free_port()
        address = os.path.join(_socket_dir(), f"hybrid-engine-{os.getpid()}-{secrets.token_hex(4)}.sock")
        authkey = secrets.token_bytes(16)
        listener = Listener(address, family="AF_UNIX", authkey=authkey)
        try:
            worker_cfg = dataclasses.replace(cfg, tokenizer=cfg.tokenizer if isinstance(cfg.tokenizer, str) else None)
            env = {**os.environ, "HYBRID_ENGINE_WORKER_AUTHKEY": authkey.hex()}
            for rank in range(1, self.world_size):
                cmd = [sys.executable, "-m", "hybrid_engine.distributed.worker", address, str(rank)]
                self.procs.append(subprocess.Popen(cmd, env=env))
            for _ in range(1, self.world_size):
                conn = _accept(listener, self.procs, timeout_s=120.0)
                self.conns.append(conn)
            self.conns.sort(key=lambda c: c.recv())  # each worker says its rank first
            init = f"tcp://127.0.0.1:{port}"
            for conn in self.conns:
                conn.send((worker_cfg, init))
            init_group(0, self.world_size, init, device)
            self.comm = Communicator(device)
        except BaseException:
            self.shutdown()
            raise
        finally:
            listener.close()

    def wait_ready(self) -> None:
        """After rank 0's own load: every worker has loaded, warmed up and captured the same graphs (each says
        "ready", or what failed)."""
        deadline = time.monotonic() + READY_TIMEOUT_S
        pending = set(range(1, self.world_size))
        while pending:
            for rank in sorted(pending):
                conn, proc = self.conns[rank - 1], self.procs[rank - 1]
                if conn.poll():
                    try:
                        msg = conn.recv()
                    except (EOFError, OSError):
                        msg = "closed its pipe"
                    if msg != "ready":
                        self._died(rank, f"failed at load: {msg}")
                    pending.discard(rank)
                elif proc.poll() is not None:
                    self._died(rank, f"exited with code {proc.returncode} while loading")
            if pending and time.monotonic() > deadline:
                raise WorkerDiedError(f"tensor-parallel workers {sorted(pending)} not ready after {READY_TIMEOUT_S} s")
            if pending:
                time.sleep(0.2)

    def runner(self, local: Any) -> "DistributedRunner":
        return DistributedRunner(local, self)

    def send(self, msg: tuple) -> None:
        data = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
        for rank, conn in enumerate(self.conns, start=1):
            try:
                conn.send_bytes(data)
            except OSError as exc:
                self._died(rank, f"its pipe broke ({exc})")

    def check(self) -> None:
        """Raise WorkerDiedError if any worker has exited or reported a failure (cheap: a poll per worker)."""
        if self.error is not None:
            raise self.error
        peer = self.comm.peer if self.comm is not None else None
        if peer is not None and peer.abandoned_any():
            self.error = WorkerDiedError(f"an all-reduce on rank 0 waited more than {PEER_TIMEOUT_S:.0f} s for the "
                                         "other ranks and gave up; the engine has shut down and accepts no more "
                                         "requests")
            raise self.error
        for rank, (proc, conn) in enumerate(zip(self.procs, self.conns), start=1):
            if proc.poll() is not None:
                self._died(rank, f"exited with code {proc.returncode}")
            if conn.poll():
                try:
                    msg = f"failed: {conn.recv()}"
                except (EOFError, OSError):  # the process is going away: report its exit code when it has one
                    try:
                        msg = f"exited with code {proc.wait(timeout=1.0)}"
                    except subprocess.TimeoutExpired:
                        msg = "closed its pipe"
                self._died(rank, msg)

    def check_after_failure(self, grace_s: float = 2.0) -> None:
        """After a collective failed on rank 0: raise WorkerDiedError if a worker is gone (waiting briefly for the
        operating system to report its exit); return if every worker lives (the failure is then rank 0's own)."""
        deadline = time.monotonic() + grace_s
        while True:
            self.check()
            if time.monotonic() > deadline:
                return
            time.sleep(0.05)

    def _died(self, rank: int, what: str) -> None:
        pid = self.procs[rank - 1].pid if rank - 1 < len(self.procs) else "?"
        self.error = WorkerDiedError(f"tensor-parallel worker rank {rank} (pid {pid}) {what}; the engine has shut "
                                     "down and accepts no more requests")
        logger.error("%s", self.error)
        raise self.error

    @property
    def healthy(self) -> bool:
        """No worker has failed or exited."""
        return self.error is None and all(p.poll() is None for p in self.procs)

    def shutdown(self, stream: Any = None, release_graphs: Any = None) -> None:
        """Leave the group in an order that never waits on a peer (see NOTES, 2026-11-30, tensor parallelism):

        1. a healthy group lets rank 0's stream finish what it was given (every collective in it meets its peers'),
           polled with a deadline, so a mismatch is treated as a failure rather than a hang;
        2. the workers' pipes close (each worker then exits at once, touching the group no more);
        3. the communicator is aborted on a helper thread: abort makes collectives stuck on a dead peer return, but
           NCCL then waits until every CUDA graph that captured its collectives is destroyed, so
        4. `release_graphs()` destroys them while the abort waits, and the abort is joined with a deadline;
        5. a worker that has not exited is killed."""
        healthy = self.healthy
        if healthy and stream is not None and not _finish(stream, SHUTDOWN_WAIT_S):
            logger.warning("tensor-parallel shutdown: rank 0's GPU work did not finish in %.0f s; aborting",
                           SHUTDOWN_WAIT_S)
            healthy = False
        for conn in self.conns:
            try:
                conn.close()
            except OSError:
                pass
        leaving = threading.Thread(target=leave_group, name="hybrid-engine-leave-group", daemon=True)
        leaving.start()
        if release_graphs is not None:
            release_graphs()
        leaving.join(SHUTDOWN_WAIT_S)
        if leaving.is_alive():
            logger.warning("tensor-parallel shutdown: the communicator's abort did not return in %.0f s",
                           SHUTDOWN_WAIT_S)
        for proc in self.procs:
            try:
                proc.wait(timeout=15.0 if healthy else 0.5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10.0)
        self.conns, self.procs = [], []


def _finish(stream: Any, timeout_s: float) -> bool:
    """Whether `stream`'s work so far completes within timeout_s (an event polled, never a blocking wait)."""
    event = torch.cuda.Event()
    event.record(stream)
    deadline = time.monotonic() + timeout_s
    while not event.query():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.001)
    return True


class DistributedRunner:
    """The runner interface EngineCore drives, over every rank: a `BROADCAST` call goes to the workers, then runs on
    rank 0's ModelRunner; everything else (buffers, graphs, sizes) is rank 0's."""

    def __init__(self, local: Any, executor: TensorParallelExecutor) -> None:
        self.local, self.executor = local, executor
        for name in BROADCAST:  # made once: the step loop calls them every step
            setattr(self, name, self._broadcaster(name))

    def _broadcaster(self, name: str) -> Any:
        run = getattr(self.local, name)
        return lambda *args, **kwargs: self._call((name, args, kwargs), run, *args, **kwargs)

    def _call(self, msg: tuple, run: Any, *args: Any, **kwargs: Any) -> Any:
        """Send `msg` to the workers, then run `run` here."""
        self.executor.check()
        self.executor.send(msg)
        try:
            return run(*args, **kwargs)
        except Exception:  # e.g. gloo's "connection closed" when a peer died: say that a worker died
            self.executor.check_after_failure()
            raise

    def decode_sample(self, rows: int, masks: Any, mask_rows: int) -> None:
        """The sample half of a constrained step: the workers get the flags and bitmask rows as data (rank 0's
        `masks` is a slot of its own staging ring)."""
        msg = ("decode_sample_masks", (rows, masks.flags.copy(), masks.bitmask[:mask_rows].clone(), mask_rows), {})
        self._call(msg, self.local.decode_sample, rows, masks, mask_rows)

    def __getattr__(self, name: str) -> Any:  # everything not broadcast is rank 0's own
        return getattr(self.local, name)


def leave_group() -> None:
    """Leave the process group without waiting for any peer: NCCL communicators are aborted (destroying one can
    wait on peers that are gone or leaving at the same time, and abort also ends a collective stuck on a dead
    peer); gloo's group is destroyed."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return
    try:
        if dist.get_backend() == "nccl":
            dist.distributed_c10d._abort_process_group()
        else:
            dist.destroy_process_group()
    except Exception as exc:  # leaving a broken group is best effort
        logger.warning("leaving the tensor-parallel process group: %s", exc)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _socket_dir() -> str:
    return os.environ.get("XDG_RUNTIME_DIR") or "/tmp"


def _accept(listener: Listener, procs: list[subprocess.Popen], timeout_s: float) -> Connection:
    """listener.accept(), but failing (not hanging) when a worker exits before it connects."""
    result: list[Any] = []
    thread = threading.Thread(target=lambda: result.append(listener.accept()), daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while thread.is_alive():
        thread.join(0.2)
        dead = [p for p in procs if p.poll() is not None]
        if dead:
            raise WorkerDiedError(f"tensor-parallel worker (pid {dead[0].pid}) exited with code "
                                  f"{dead[0].returncode} before connecting")
        if time.monotonic() > deadline:
            raise WorkerDiedError(f"tensor-parallel workers did not connect within {timeout_s} s")
    return result[0]
