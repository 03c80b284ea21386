"""The gateway: tokenmill's OpenAI-compatible HTTP API, the one door tenants use.

It authenticates every call by its API key, stamps the tenant on everything it
publishes, makes every id, and scopes every read, stream, cancel and list to the
caller. Everything behind it (Kafka, Redis, the ledger) is reached only by services.
"""
