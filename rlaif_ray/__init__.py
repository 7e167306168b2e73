"""rlaif_ray: online RL from AI feedback on Ray (vLLM rollouts, LLM critic, DeepSpeed learners)."""
__version__ = "0.1.0"
