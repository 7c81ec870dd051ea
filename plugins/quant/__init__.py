"""Built-in quantization methods, registered lazily (each module is imported on first use):

* ``"gptq"``: GPTQ weight-only, 4/8 bits, groups, act-order (``plugins.quant.gptq.GPTQConfig``);
* ``"awq"``: AWQ 4-bit, GEMM layout (``plugins.quant.awq.AWQConfig``);
* ``"squeezellm"``: SqueezeLLM dense 4-bit lookup tables (``plugins.quant.squeezellm.SqueezeLLMConfig``).

GPTQ and AWQ layers share one in-memory layout and matmul
(``plugins.quant.int4_common``).
"""

from framework.hookspecs import hookimpl


@hookimpl
def register_quantizers(register):
    register("gptq", "plugins.quant.gptq:GPTQConfig")
    register("awq", "plugins.quant.awq:AWQConfig")
    register("squeezellm", "plugins.quant.squeezellm:SqueezeLLMConfig")
