"""Triton kernels for the SAE ops (used by sae_fast.ops on CUDA, or on the CPU under TRITON_INTERPRET=1).

encode.py   the encoder's dense half: a tile GEMM x @ W.T + b, and the same GEMM fused with a running top-k
sparse.py   the sparse halves: gather-combine, pair dot products, reverse-index segmented reduction

Import them as `sae_fast.kernels.encode` / `sae_fast.kernels.sparse`, only after TRITON_INTERPRET is decided.
"""
