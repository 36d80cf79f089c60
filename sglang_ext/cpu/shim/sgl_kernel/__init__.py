"""agentserve's CPU stand-in for `sgl_kernel` (see sglang_ext/cpu/kernels.py).

This directory is put on PYTHONPATH by `agentserve launch` only for CPU servers on machines
where no real sgl_kernel is importable, so it never shadows the real library.
"""

from sglang_ext.cpu.kernels import populate_standin

populate_standin(globals())
