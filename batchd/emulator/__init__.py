"""One emulator per provider protocol family (tests, benchmarks, ``batchd demo``).

``openai`` serves the Files + Batches API (Azure and OpenAI-compatible services
use it under their URL shapes; ``openai_wire`` and ``openai_lines`` hold its wire
objects and result lines), ``anthropic`` the Message Batches API, ``gemini`` the
Batch Mode API. ``base`` is what they share: the command-line runner, and for
Anthropic and Gemini the server lifecycle, admin routes and fault scripts.
"""
