"""Sweeps that measure kernel configs on the present card and choose the entries of its tuning table
(kernels/tuning.py): one module per kernel family, beside the CUDA-graph timing they share.

`decode_gemm_sweep` chooses the decode GEMM's (BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages, SWAP) per weight
shape, `prefill_gemm_sweep` the prefill projection plan (cuBLAS, cuBLASLt, the transposed copy, the decode GEMM or a
Triton GEMM config per prompt bucket) per weight shape, `cached_attention_sweep` the cached-prefill attention's
(BLOCK_M, BLOCK_N, num_warps, num_stages, SPLITS) per new-token count. Each search runs over a bench object that
times one config (the real one on the GPU; tests pass a fake), so the search itself runs without CUDA.
"""
