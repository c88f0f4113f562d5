"""Tensor parallelism over the GPUs of one host: weight sharding (sharding.py), collectives (comm.py), the worker
processes of ranks 1.. (worker.py) and the front end's side of them (executor.py)."""
