"""The lab beside the runtime: what the studies, benchmarks and simulations under jobs/ share (claims and feedback
studies, stage-alone benchmarks, the TRL peer, FLOP arithmetic, the scale simulation's stand-in actors and report).
Nothing in `rlaif_ray` imports it; it imports `rlaif_ray` like any user would.
"""
