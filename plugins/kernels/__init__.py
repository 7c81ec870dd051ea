"""Built-in attention backends.

Registers the reference paged-attention backend (pure torch, CPU and GPU).
The target is a lazy ``"module:Class"`` string, so listing plugins never
imports the kernel module.
"""

from framework.hookspecs import hookimpl


@hookimpl
def register_attention_backends(register):
    register("torch", "plugins.kernels.torch_paged:TorchPagedAttention")
