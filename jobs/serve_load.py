"""Load test of `rlaif-ray serve`: deploy a checkpoint, send a few hundred requests (every 10th hostile), report.

    python jobs/serve_load.py toy:policy --requests 300 --concurrency 16 --out runs/serve_load [overrides...]

Deploys CHECKPOINT with Ray Serve exactly as `rlaif-ray serve` does (bearer token on), runs
`rlaif_ray.serve.loadtest.run_load` against it on 127.0.0.1 (valid completions mixed with oversized, malformed,
out-of-range and unauthenticated requests), checks /health afterwards, prints and writes OUT/serve_load.json:
answers by kind and status, errors (anything but 200 for a valid request and its own 4xx for a hostile one),
requests/s and latency percentiles of the valid requests. Exit code 1 if any request went wrong.
"""
import argparse
import json
import os
import secrets
import sys
from pathlib import Path


def main(argv=None) -> int:
    from rlaif_ray.config import ConfigError, load_config

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", nargs="?", default="toy:policy")
    parser.add_argument("--config", "-c", default=None)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--out", default="runs/serve_load")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args(argv)  # overrides anywhere on the line
    os.environ.setdefault("RLAIF_SERVE_LOAD_KEY", secrets.token_urlsafe(24))
    try:
        cfg = load_config(args.config, ["serve.api_key_env=RLAIF_SERVE_LOAD_KEY", *args.overrides])
    except ConfigError as err:
        print(f"serve_load: error: {err}", file=sys.stderr)
        return 2
    import httpx
    from ray import serve

    from rlaif_ray.serve.app import deploy
    from rlaif_ray.serve.loadtest import run_load

    info = deploy(cfg, args.checkpoint)
    try:
        prompts = [f"{a}+{b}=" for a in range(10) for b in range(10)]
        result = run_load(info["url"], cfg.serve.model_id, prompts, args.requests, args.concurrency,
                          os.environ["RLAIF_SERVE_LOAD_KEY"], max_request_bytes=cfg.serve.max_request_bytes)
        result["healthy_after"] = httpx.get(info["url"].removesuffix("/v1") + "/health", timeout=30).status_code == 200
        result["deploy_s"], result["checkpoint"] = info["deploy_s"], info["checkpoint"]
    finally:
        serve.shutdown()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "serve_load.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    print(f"written: {out / 'serve_load.json'}")
    return 0 if result["errors"] == 0 and result["healthy_after"] else 1


if __name__ == "__main__":  # vLLM on CPU spawns processes: keep the guard
    sys.exit(main())
