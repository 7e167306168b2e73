"""Commands beside `train`: `rlaif-ray eval` and `label`, and the benchmark arithmetic the jobs/ scripts use.
A top layer: may import anything below.
"""
