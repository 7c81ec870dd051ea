"""Built-in token samplers.

Registers ``"standard"``: greedy and random sampling with temperature,
top-k, top-p, min-p and per-request seeds, vectorised over the batch
(``plugins.samplers.standard.StandardSampler``). The module is imported
lazily, on first use.
"""

from framework.hookspecs import hookimpl


@hookimpl
def register_samplers(register):
    register("standard", "plugins.samplers.standard:StandardSampler")
