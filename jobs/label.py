"""Ray job entrypoint for `rlaif-ray label`, e.g.

    ray job submit --working-dir . -- python jobs/label.py -c jobs/configs/toy_cpu.yaml --out /mnt/labels.parquet ray.address=auto

Same arguments as `rlaif-ray label`; with `ray.address=auto` it joins the cluster the job runs on.
"""
import sys

from rlaif_ray.cli import main

if __name__ == "__main__":  # vLLM on CPU spawns processes: keep the guard
    sys.exit(main(["label", *sys.argv[1:]]))
