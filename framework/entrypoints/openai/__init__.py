"""The OpenAI-compatible server (``framework serve``).

One concept per module: ``protocol`` (request/response bodies),
``errors`` (OpenAI error bodies), ``sampling`` (request -> SamplingParams),
``serving_*`` (one per endpoint family), ``streaming`` (SSE, deltas,
disconnects), ``metrics`` (Prometheus + stats line), ``cli_args``
(``ServerConfig`` and its flags), ``api_server`` (app, routes, auth, run).
"""
