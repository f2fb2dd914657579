"""Token quotas: limits per tenant, app and model, reserved atomically before a
request runs and settled with its real usage (see docs/quotas.md).

    limits.py       which limits apply to a request (pure)
    periods.py      calendar days and months in a time zone (pure)
    tokens.py       prompt token counts: tokenizer or estimate
    store.py        the QuotaStore protocol and its result types
    memory.py       the in-process store (one gateway process)
    redis_store.py  the Redis store (any number of replicas; Lua scripts)
    redis_wire.py   its scripts on the wire: pre-encoded, on connections of its own
    breaker.py      timeouts and a circuit breaker around a remote store
    keeper.py       lease renewal and settlement that survives cancellation
    headers.py      OpenAI's x-ratelimit-* headers
    admission.py    per-request admission: the Quota service and its Grants
"""
