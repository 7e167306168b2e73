"""The driver side: input checks, the Orchestrator and its loop, actor pools, faults and recovery, checkpoints,
placement groups, the learner group handle, metrics, the run report. Imports the stages and everything below.
"""
