"""Inference engines: vLLM, remote OpenAI-compatible, simulated."""
