"""Built-in model architectures (registered lazily: nothing here imports torch).

``plugins.models.llama`` serves the Llama family: Llama 1-3, Mistral and
Qwen2 differ only in their config (biases, rope scaling, sliding window).
"""

from framework.hookspecs import hookimpl


@hookimpl
def register_models(register):
    register("LlamaForCausalLM", "plugins.models.llama:LlamaForCausalLM")
    register("MistralForCausalLM", "plugins.models.llama:MistralForCausalLM")
    register("Qwen2ForCausalLM", "plugins.models.llama:Qwen2ForCausalLM")
