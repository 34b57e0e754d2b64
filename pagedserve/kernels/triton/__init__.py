"""Triton kernels, one module per kernel, each matching its plain-torch twin in
pagedserve.kernels.reference. The kernel modules import triton at import time; go through
pagedserve.kernels.registry.get_kernel_set("triton") (which imports them lazily) from code that
must run without it."""
