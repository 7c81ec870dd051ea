"""Built-in attention backends.

Registers the reference paged-attention backend (pure torch, CPU and GPU,
priority 0) and the Triton backend (CUDA sm80+, priority 10: chosen on GPUs
that support it; ``supports()`` names the reason elsewhere). The targets are
lazy ``"module:Class"`` strings, so listing plugins never imports a kernel
module.
"""

from framework.hookspecs import hookimpl


@hookimpl
def register_attention_backends(register):
    register("torch", "plugins.kernels.torch_paged:TorchPagedAttention")
    register("triton", "plugins.kernels.triton_paged:TritonPagedAttention")
