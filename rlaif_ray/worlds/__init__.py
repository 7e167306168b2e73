"""Built-in worlds a run can name instead of a path (`model.policy: toy`): models, tokenizers and prompt files
built locally and cached. Imports only the bottom layer and the judge's prompt composition.
"""
