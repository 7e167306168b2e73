"""Serving a checkpoint with Ray Serve's LLM app: the app and `rlaif-ray serve`, the request guard, the load test.
A top layer beside the CLI.
"""
