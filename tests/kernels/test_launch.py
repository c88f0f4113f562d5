"""The Triton launch cache (`_triton.launch`): which launches hit, what the launcher receives, and (GPU) that cached
launches compute what Triton's own launch path computes."""
import threading
import types

import pytest
import torch
from kernel_helpers import assert_close, rand

from hybrid_engine.kernels import _triton, gemm, rms_norm
from hybrid_engine.kernels.gemv import linear_ref


class FakeKernel:
    """Stands in for Triton's CompiledKernel: records launcher calls."""
    function, packed_metadata = 1234, ("meta",)

    def __init__(self):
        self.runs = []

    def run(self, *a):
        self.runs.append(a)

    def launch_metadata(self, grid, stream, *args):
        return None


class FakeJit:
    """Stands in for `jit(fn)`: `[grid](*args, **kw)` 'compiles' (a new FakeKernel) and launches."""

    def __init__(self):
        self.compiles = []

    def __getitem__(self, grid):
        def run(*args, **kw):
            self.compiles.append((grid, args, kw))
            return FakeKernel()
        return run


class FakeRuntime:
    launch_enter_hook = None
    launch_exit_hook = None


def fake_kernel(X, Y, n, eps, FLAG, BLOCK: "constexpr" = 64):  # noqa: F821 - the signature is what matters
    pass


@pytest.fixture
def fake_triton(monkeypatch):
    fj = FakeJit()
    monkeypatch.setattr(_triton, "_launch_api", lambda: (lambda: 0, lambda device: 77, FakeRuntime))
    monkeypatch.setattr(_triton, "jit", lambda fn: fj)
    monkeypatch.setattr(_triton, "_LAUNCHES", {})
    monkeypatch.setattr(_triton, "_FAST_LAUNCH", True)
    return fj


def cached_kernels():
    return [k for k, _ in _triton._LAUNCHES.values()]


def test_hit_passes_addresses_and_constexprs_in_signature_order(fake_triton):
    x = torch.zeros(64, dtype=torch.float16)
    y = torch.zeros(64, dtype=torch.float32)
    _triton.launch(fake_kernel, (3,), x, y, 48, 1e-5, True, num_warps=4)
    assert len(fake_triton.compiles) == 1 and len(_triton._LAUNCHES) == 1
    _triton.launch(fake_kernel, (5, 2), x, y, 32, 0.5, True, num_warps=4)  # same specialisation: a hit
    assert len(fake_triton.compiles) == 1
    (kernel,) = cached_kernels()
    (run,) = kernel.runs
    assert run[:4] == (5, 2, 1, 77)  # grid padded to 3-D, the stream of the current device
    assert run[4:7] == (FakeKernel.function, FakeKernel.packed_metadata, None)
    # tensors as addresses, then the remaining parameters in signature order (BLOCK from its default)
    assert run[9:] == (x.data_ptr(), y.data_ptr(), 32, 0.5, True, 64)


@pytest.mark.parametrize("change", ["int_not_16", "int_one", "int_64bit", "dtype", "misaligned", "bool",
                                    "constexpr", "option"])
def test_every_specialisation_change_misses(fake_triton, change):
    x = torch.zeros(64, dtype=torch.float16)
    args = [x, x, 32, 1.0, True]
    kw = {"num_warps": 4}
    _triton.launch(fake_kernel, (1,), *args, **kw)
    if change == "int_not_16":
        args[2] = 33
    elif change == "int_one":
        args[2] = 1
    elif change == "int_64bit":
        args[2] = 1 << 36
    elif change == "dtype":
        args[1] = x.float()
    elif change == "misaligned":
        args[1] = x[1:]  # 2 bytes past a 16-byte boundary
    elif change == "bool":
        args[4] = False
    elif change == "constexpr":
        kw["BLOCK"] = 128
    else:
        kw["num_warps"] = 8
    _triton.launch(fake_kernel, (1,), *args, **kw)
    assert len(fake_triton.compiles) == 2, change
    assert all(not k.runs for k in cached_kernels())


def test_float_values_and_addresses_do_not_miss(fake_triton):
    x = torch.zeros(64, dtype=torch.float16)
    _triton.launch(fake_kernel, (1,), x, x, 32, 1.0, True)
    _triton.launch(fake_kernel, (1,), torch.zeros(16, dtype=torch.float16), x[8:], 48, 2.5, True)  # aligned too
    assert len(fake_triton.compiles) == 1


def test_bound_launch_replaces_addresses_and_rechecks(fake_triton):
    x = torch.zeros(64, dtype=torch.float16)
    w0, w1 = torch.zeros(32, dtype=torch.float16), torch.ones(32, dtype=torch.float16)
    bound = _triton.Launch(fake_kernel, (3,), (x, w0, 48, 1e-5, True), {"num_warps": 4})
    bound()  # first: through Triton ('compiles'), remembered
    assert len(fake_triton.compiles) == 1
    bound({1: w1})
    (kernel,) = cached_kernels()
    assert kernel.runs[-1][:4] == (3, 1, 1, 77)
    assert kernel.runs[-1][9:] == (x.data_ptr(), w1.data_ptr(), 48, 1e-5, True, 64)
    assert len(fake_triton.compiles) == 1
    misaligned, other_dtype = w1[1:], w1.float()
    bound({1: misaligned})  # not 16-byte aligned: Triton specialised on alignment, so a full launch
    bound({1: other_dtype})  # another dtype: a full launch
    assert len(fake_triton.compiles) == 3
    assert fake_triton.compiles[1][1][1] is misaligned and fake_triton.compiles[2][1][1] is other_dtype


def test_empty_hook_chains_keep_the_fast_path(fake_triton, monkeypatch):
    """Triton (>= 3.4) keeps its launch hooks as chains that exist while empty: those count as no hook (a bound
    launch takes the cached path and the launcher gets None for hooks and metadata); a chain holding a hook is
    passed to the launcher, with Triton's metadata for it."""
    knobs = pytest.importorskip("triton.knobs")
    if not hasattr(knobs, "HookChain"):
        pytest.skip("this Triton keeps launch hooks as plain attributes")

    class ChainRuntime:
        launch_enter_hook = knobs.HookChain()
        launch_exit_hook = knobs.HookChain(reversed=True)

    monkeypatch.setattr(_triton, "_launch_api", lambda: (lambda: 0, lambda device: 77, ChainRuntime))
    x, w0, w1 = (torch.zeros(64, dtype=torch.float16) for _ in range(3))
    bound = _triton.Launch(fake_kernel, (3,), (x, w0, 48, 1e-5, True), {"num_warps": 4})
    bound()
    bound({1: w1})
    _triton.launch(fake_kernel, (3,), x, w1, 48, 1e-5, True, num_warps=4)  # a hit of the unbound launch too
    (kernel,) = cached_kernels()
    assert len(fake_triton.compiles) == 1 and len(kernel.runs) == 2
    assert all(run[6:9] == (None, None, None) for run in kernel.runs)  # metadata, enter hook, exit hook

    def hook(meta):
        pass

    ChainRuntime.launch_enter_hook.add(hook)
    bound({1: w0})  # a hook is set: through `launch`, which passes the hook chains
    _triton.launch(fake_kernel, (3,), x, w1, 48, 1e-5, True, num_warps=4)
    assert len(fake_triton.compiles) == 1 and len(kernel.runs) == 4
    assert all(run[7] is ChainRuntime.launch_enter_hook and run[8] is None  # the exit chain is still empty
               for run in kernel.runs[2:])


def test_disabled_goes_through_triton(fake_triton):
    prev = _triton.set_fast_launch(False)
    try:
        x = torch.zeros(8)
        for _ in range(2):
            _triton.launch(fake_kernel, (1,), x, x, 32, 1.0, True)
        assert len(fake_triton.compiles) == 2 and not _triton._LAUNCHES
    finally:
        _triton.set_fast_launch(prev)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("m", [1, 16, 37, 100])
def test_cached_launch_matches_triton_launch_gpu(m):
    """Second (cached) launches compute the same as Triton's own launch path, on fresh inputs each time."""
    dev, dtype = torch.device("cuda"), torch.float16
    w = rand(96, 80, dtype=dtype, device=dev, seed=3, scale=0.2)
    nw = rand(80, dtype=dtype, device=dev, seed=4)
    for seed in range(3):
        x = rand(m, 80, dtype=dtype, device=dev, seed=10 + seed)
        res = rand(m, 80, dtype=dtype, device=dev, seed=20 + seed)
        outs = {}
        for fast in (False, True):
            prev = _triton.set_fast_launch(fast)
            try:
                outs[fast] = (gemm.gemm_triton(x, w, config=(16, 32, 32, 4, 2)),
                              *rms_norm.rms_norm_triton(x, nw, 1e-5, res))
            finally:
                _triton.set_fast_launch(prev)
        for a, b in zip(outs[False], outs[True]):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert_close(outs[True][0], linear_ref(x.float(), w.float()), dtype, "gemm")


class FakeAsyncCompileMode:
    """Stands in for Triton's AsyncCompileMode: a context that records that it was entered and left."""
    made = []

    def __init__(self, executor):
        self.executor, self.entered, self.left = executor, False, False
        FakeAsyncCompileMode.made.append(self)

    def __enter__(self):
        self.entered = True
        return self

    def __exit__(self, *exc):
        self.left = True


@pytest.fixture
def fake_async(monkeypatch, fake_triton):
    import sys
    import types

    module = types.ModuleType("triton.runtime._async_compile")
    module.AsyncCompileMode = FakeAsyncCompileMode
    monkeypatch.setitem(sys.modules, "triton.runtime._async_compile", module)
    FakeAsyncCompileMode.made = []
    warmups = []
    fake_triton.warmup = lambda *args, grid, **kw: warmups.append((grid, args, kw))
    return warmups


def test_compile_only_compiles_through_triton_and_launches_nothing(fake_async):
    x = torch.zeros(64, dtype=torch.float16)
    with _triton.compile_only(4) as compiling:
        assert compiling
        assert _triton.launch(fake_kernel, (3,), x, x, 48, 1e-5, True, num_warps=4) is None
    (mode,) = FakeAsyncCompileMode.made
    assert mode.entered and mode.left and mode.executor._max_workers == 4
    assert fake_async == [((3,), (x, x, 48, 1e-5, True), {"num_warps": 4})]  # Triton's own warm-up (compile) call
    assert _triton._LAUNCHES == {}  # nothing launched, nothing cached as launched
    _triton.launch(fake_kernel, (3,), x, x, 48, 1e-5, True, num_warps=4)  # after the block: a launch again
    assert len(_triton._LAUNCHES) == 1 and len(cached_kernels()[0].runs) == 0  # (first launch goes through jit)


class FakeCompiled:
    """A compiled kernel whose launcher and module load (`_init_handles`) records the thread it ran on."""

    def __init__(self, fail: bool = False):
        self.fail, self.threads = fail, []

    def _init_handles(self):
        self.threads.append(threading.current_thread().name)
        if self.fail:
            raise RuntimeError("out of shared memory")


def test_load_compiled_loads_every_finished_kernel_on_the_pool_and_leaves_failures_to_the_launch():
    from concurrent.futures import ThreadPoolExecutor

    kernels = [FakeCompiled(), FakeCompiled(fail=True), FakeCompiled()]
    futures = [types.SimpleNamespace(kernel=k) for k in kernels] + [types.SimpleNamespace(kernel=None)]
    with ThreadPoolExecutor(2, thread_name_prefix="loader") as pool:
        assert _triton.load_compiled(futures, pool, None) == 2
    assert all(len(k.threads) == 1 and k.threads[0].startswith("loader") for k in kernels)


def test_compile_only_loads_what_it_compiled_before_leaving(fake_async):
    kernel = FakeCompiled()
    with _triton.compile_only(3):
        FakeAsyncCompileMode.made[0].future_kernels = {"key": types.SimpleNamespace(kernel=kernel)}
    assert len(kernel.threads) == 1 and kernel.threads[0].startswith("hybrid-engine-compile")


@pytest.mark.parametrize("workers", [0, 1])
def test_compile_only_with_fewer_than_two_workers_leaves_launches_alone(fake_async, workers):
    x = torch.zeros(64, dtype=torch.float16)
    with _triton.compile_only(workers) as compiling:
        assert not compiling
        _triton.launch(fake_kernel, (3,), x, x, 48, 1e-5, True, num_warps=4)
    assert fake_async == [] and len(_triton._LAUNCHES) == 1 and FakeAsyncCompileMode.made == []


def test_compile_only_is_off_without_the_launch_api(monkeypatch):
    monkeypatch.setattr(_triton, "_launch_api", lambda: None)  # the interpreter, or an older Triton
    with _triton.compile_only(8) as compiling:
        assert not compiling


def test_compile_workers_reads_the_environment(monkeypatch):
    monkeypatch.setenv("HYBRID_ENGINE_COMPILE_WORKERS", "3")
    assert _triton.compile_workers() == 3
    monkeypatch.setenv("HYBRID_ENGINE_COMPILE_WORKERS", "many")
    with pytest.raises(ValueError, match="HYBRID_ENGINE_COMPILE_WORKERS='many' must be an int >= 0 or 'auto'"):
        _triton.compile_workers()
    monkeypatch.setenv("HYBRID_ENGINE_COMPILE_WORKERS", "auto")
    assert 1 <= _triton.compile_workers() <= 16
    monkeypatch.setenv("HYBRID_ENGINE_COMPILE_WORKERS", "0")
    assert _triton.compile_workers() == 0
    monkeypatch.delenv("HYBRID_ENGINE_COMPILE_WORKERS")
    assert 1 <= _triton.compile_workers() <= 16  # default: auto


def test_warm_cache_marker_lives_in_the_triton_cache_and_names_its_material(monkeypatch, tmp_path):
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    a = _triton.warm_cache_marker("model A, rows (1, 2)")
    assert a.parent == tmp_path / "hybrid_engine_warm"
    assert a == _triton.warm_cache_marker("model A, rows (1, 2)")
    assert a != _triton.warm_cache_marker("model A, rows (1, 2, 4)")


def test_preload_switch_leaves_loading_to_the_first_launch(fake_async, monkeypatch):
    monkeypatch.setenv("HYBRID_ENGINE_PRELOAD_COMPILED", "0")
    kernel = FakeCompiled()
    with _triton.compile_only(3):
        FakeAsyncCompileMode.made[0].future_kernels = {"key": types.SimpleNamespace(kernel=kernel)}
    assert kernel.threads == []
