"""One file per Ray actor role of the pipeline: RolloutWorker, CriticLabeler, RewardScorer, RewardModelTrainer,
LearnerRank. Imports the layers below (config, data, engine, algorithms, judge, worlds), never the runtime.
"""
