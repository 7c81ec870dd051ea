"""Hook specifications: the whole contract between the core and its plugins.

Every plugin is a module (or object) found through the ``framework.plugins``
entry-point group that implements some of the hooks below with
``@framework.hookimpl``. The registration hooks use the callback style of the
``llm`` CLI: the core passes a ``register`` function and the plugin calls it
once per thing it provides. Specs may gain keyword arguments in later
versions, never lose them, so an implementation only names what it uses.

Targets given to ``register`` may be the object itself or a lazy
``"module:Attribute"`` string; the core imports the module only when the
target is first used, so listing plugins never imports torch models, Triton
or CUDA.

Hooks are grouped by when they fire:

* start-up (``framework.build`` / ``framework plugins``): the four
  ``register_*`` hooks, called once per process and cached;
* engine construction: ``choose_attention_backend``.
"""

from __future__ import annotations

import pluggy

PROJECT_NAME = "framework"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


# -- start-up: registration ------------------------------------------------


@hookspec
def register_models(register):
    """Register model architectures.

    Fires once per process, when the first engine is built or when the
    registry is listed.

    :param register: ``register(architecture, target)``. ``architecture`` is a
        Hugging Face ``architectures`` entry of config.json, e.g.
        ``"LlamaForCausalLM"``; ``target`` is the ``torch.nn.Module`` class
        or a lazy ``"module:Class"`` string. The class is constructed as
        ``Class(hf_config, ctx)`` (``framework.config.HFConfig``,
        ``framework.layers.LayerContext``) and must provide
        ``forward(input_ids, positions) -> hidden``,
        ``compute_logits(hidden) -> logits`` and
        ``load_weights(weights) -> set[str]`` (see ``framework.interfaces``).

    The return value is ignored. Registering a name twice is an error that
    names both plugins.
    """


@hookspec
def register_attention_backends(register):
    """Register paged-attention backends.

    Fires once per process (start-up).

    :param register: ``register(name, target)``; ``target`` is a subclass of
        ``framework.attention.AttentionBackend`` (or a ``"module:Class"``
        string). The class carries its ``priority`` and a ``supports(...)``
        classmethod that returns ``None`` or the reason it cannot run.

    The return value is ignored.
    """


@hookspec
def register_quantizers(register):
    """Register quantization methods.

    Fires once per process (start-up).

    :param register: ``register(name, target)``. ``name`` is the
        ``quantization_config.quant_method`` used by Hugging Face checkpoints
        (``"gptq"``, ``"awq"``...) or a KV-cache dtype (``"fp8"``);
        ``target`` is a ``framework.interfaces.QuantConfig`` subclass or a
        ``"module:Class"`` string.

    The return value is ignored.
    """


@hookspec
def register_samplers(register):
    """Register token samplers and decoding strategies.

    Fires once per process (start-up).

    :param register: ``register(name, target)``; ``target`` (a class or a
        lazy ``"module:Class"`` string) is one of:

        * a ``framework.interfaces.Sampler`` subclass: token level,
          constructed once per engine with no arguments, then called each
          step with the logits of the rows whose request names it
          (``SamplingParams.sampler``; built in: ``"standard"``) and a
          ``framework.sampling_metadata.SamplingMetadata``;
        * a ``framework.interfaces.DecodingStrategy`` subclass: request
          level, constructed per request as ``Class(params, ops)`` when the
          request names it (``SamplingParams.strategy``; built in:
          ``"parallel"``, ``"beam_search"``).

    The return value is ignored. A request naming something that is not
    registered, or of the wrong kind, is a ``ValueError`` that lists the
    installed ones.
    """


# -- engine construction -----------------------------------------------------


@hookspec(firstresult=True)
def choose_attention_backend(device, model_config, candidates):
    """Pick the attention backend for one device.

    Fires once per engine (and per worker device), after the model config is
    known and only when the config does not name ``attention_backend``.

    :param device: the ``torch.device`` the model runs on.
    :param model_config: the engine's ``framework.model_config.ModelConfig``
        (dtype, head_dim, KV-cache dtype, block size...).
    :param candidates: ``{name: backend_class}`` of the registered backends
        that support this device and model, highest priority first.

    :return: a backend name from ``candidates``, or ``None`` to let the next
        implementation (finally the core's default: highest priority) decide.
        Stops at the first non-None result.
    """
