"""Prompt files and their sampler, the Arrow schema of every stage, tables through the object store, and the
ground-truth checkers. The bottom layer with `config`, `algorithms` and `engine`: imports nothing above it.
"""
