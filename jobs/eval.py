"""Ray job entrypoint for `rlaif-ray eval`, e.g.

    ray job submit --working-dir . -- python jobs/eval.py CHECKPOINT --reference REF -c jobs/configs/toy_cpu.yaml ray.address=auto

Same arguments as `rlaif-ray eval`; with `ray.address=auto` it joins the cluster the job runs on.
"""
import sys

from rlaif_ray.cli import main

if __name__ == "__main__":  # vLLM on CPU spawns processes: keep the guard
    sys.exit(main(["eval", *sys.argv[1:]]))
