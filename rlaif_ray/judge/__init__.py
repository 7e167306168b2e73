"""The AI judge: how a judge prompt is composed, the local (vLLM, transformers) and remote (OpenAI-compatible)
backends and their common reply, label quality and the bias report, prompt-injection measurement.
Imports only the bottom layer (config, data, engine).
"""
