"""Ray job entrypoint for training, e.g.

    ray job submit --working-dir . -- python jobs/train.py -c jobs/configs/toy_cpu.yaml ray.address=auto

Same arguments as `rlaif-ray train`; with `ray.address=auto` it joins the cluster the job runs on instead
of starting an embedded one.
"""
import sys

from rlaif_ray.cli import main

if __name__ == "__main__":  # vLLM on CPU spawns processes: keep the guard
    sys.exit(main(["train", *sys.argv[1:]]))
