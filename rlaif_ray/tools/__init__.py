"""Commands beside `train`: `rlaif-ray eval`, `label` and `train-judge`. A top layer: may import anything below.
(The studies' and benchmarks' shared code is the `rlaif_lab` package beside this one.)
"""
