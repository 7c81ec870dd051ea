"""Built-in token samplers and decoding strategies.

Registers, lazily (each module is imported on first use):

* ``"standard"``: the token sampler -- greedy and random sampling with
  temperature, top-k, top-p, min-p, penalties, logit bias, ``min_tokens`` and
  per-request seeds, vectorised over the batch
  (``plugins.samplers.standard.StandardSampler``);
* ``"parallel"``: the default decoding strategy -- n / best_of sequences per
  request (``plugins.samplers.parallel.ParallelSampling``);
* ``"beam_search"``: beam search as transformers ranks it
  (``plugins.samplers.beam_search.BeamSearch``).
"""

from framework.hookspecs import hookimpl


@hookimpl
def register_samplers(register):
    register("standard", "plugins.samplers.standard:StandardSampler")
    register("parallel", "plugins.samplers.parallel:ParallelSampling")
    register("beam_search", "plugins.samplers.beam_search:BeamSearch")
