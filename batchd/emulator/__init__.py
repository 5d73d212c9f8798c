"""One emulator per provider protocol family (tests, benchmarks, ``batchd demo``).

The OpenAI Files + Batches emulator lives at ``batchd.provider.emulator``; Azure and
OpenAI-compatible services are served by it under their URL shapes.
"""
