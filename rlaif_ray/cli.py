"""`rlaif-ray` console command: train, label, preferences, train-judge, eval, serve, build-toy, report, show-config."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="YAML config (see jobs/configs/)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. loop.num_steps=10 learner.num_learners=2")


def main(argv: list[str] | None = None) -> int:
    from rlaif_ray.config import ConfigError, load_config
    from rlaif_ray.data.prompts import PromptFileError
    from rlaif_ray.runtime.faults import RunStopped

    parser = argparse.ArgumentParser(prog="rlaif-ray", description="Online RL from AI feedback on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)
    tr = sub.add_parser("train", help="run an RLAIF job (embedded local Ray cluster unless ray.address)")
    tr.add_argument("--resume", metavar="RUN_DIR", default=None,
                    help="continue the run in RUN_DIR from its latest checkpoint (its config.yaml + overrides); "
                         "'auto' (with -c): continue output.run_dir from its latest checkpoint if it has one, else "
                         "start it (a job submitted again after its driver, head or node was lost)")
    _config_args(tr)
    _config_args(sub.add_parser("build-toy", help="build (or reuse) the toy world and print its paths"))
    _config_args(sub.add_parser("show-config", help="print the resolved config as YAML"))
    lab = sub.add_parser("label", help="label a prompts file with the configured judge and write Parquet (no training)")
    lab.add_argument("--out", required=True, help="Parquet file to write (rewards schema)")
    _config_args(lab)
    pref = sub.add_parser("preferences", help="turn labels (`label` output or a run's labels/) into a preference "
                                              "file (JSONL: prompt, chosen, rejected, label) for preferences.path")
    pref.add_argument("labels", help="Parquet file of `rlaif-ray label`, or a run's labels/ folder")
    pref.add_argument("--out", required=True, help="JSONL file to write")
    pref.add_argument("--hard", action="store_true", help="label 1 for the judge's winner (ties left out); "
                                                          "default: the judge's soft win probability")
    ev = sub.add_parser("eval", help="judge a checkpoint against a reference (checkpoint or responses JSONL)")
    ev.add_argument("checkpoint", help="Hugging Face folder of the candidate policy")
    ev.add_argument("--reference", required=True, help="a checkpoint folder, or JSONL with prompt_id/prompt + response")
    ev.add_argument("--out", default=None, help="output folder for eval.json / eval.png (default: CHECKPOINT/../eval)")
    ev.add_argument("--temperature", type=float, default=0.0)
    _config_args(ev)
    srv = sub.add_parser("serve", help="serve a checkpoint with Ray Serve behind OpenAI-compatible routes")
    srv.add_argument("checkpoint", help="Hugging Face folder (a run's checkpoint/), or toy:policy / toy:critic / smol")
    srv.add_argument("--detach", action="store_true", help="return once healthy (needs ray.address: a running cluster)")
    _config_args(srv)
    tj = sub.add_parser("train-judge", help="fine-tune the judge (model.critic) on a preference file so that the verdict "
                                            "the labeler reads matches its labels (judge_training.*)")
    tj.add_argument("preferences", help="preference file (JSONL/Parquet/dataset folder; preferences.*_key fields); "
                                        "with critic.method=direct, graded answers (prompt, response, grade in [0, 1])")
    tj.add_argument("--out", required=True, help="folder for the tuned judge (Hugging Face) and judge_report.*")
    _config_args(tj)
    rep = sub.add_parser("report", help="re-write report.md/report.png of a run folder")
    rep.add_argument("run_dir")
    args, rest = parser.parse_known_args(argv)  # overrides may also follow options: eval CKPT --reference R k=v
    stray = [a for a in rest if a.startswith("-") or "=" not in a]
    if stray or (rest and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or rest)}")
    if rest:
        args.overrides = [*args.overrides, *rest]

    try:
        if args.command == "report":
            from rlaif_ray.runtime.report import write_report
            print(write_report(args.run_dir))
            return 0
        if args.command == "preferences":
            from rlaif_ray.data.preferences import write_preference_file
            print(json.dumps(write_preference_file(args.labels, args.out, args.hard), indent=1))
            return 0
        if getattr(args, "resume", None) == "auto":
            args.resume = _auto_resume(load_config(args.config, args.overrides))
        elif getattr(args, "resume", None):
            if args.config:
                parser.error("--resume takes the run's own config.yaml: give overrides, not --config")
            if not os.path.isfile(os.path.join(args.resume, "config.yaml")):
                raise ConfigError(f"--resume {args.resume}: no config.yaml there (not a run folder)")
        if getattr(args, "resume", None) and args.config is None:  # --resume RUN_DIR: the run's own config.yaml
            run_yaml = os.path.join(args.resume, "config.yaml")
            args.config, args.overrides = run_yaml, [*args.overrides, f"output.run_dir={args.resume}"]
        cfg = load_config(args.config, args.overrides)
        if args.command == "show-config":
            import yaml
            print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
        elif args.command == "build-toy":
            from rlaif_ray.worlds.toy import build_toy_world
            world = build_toy_world(cfg.toy, cfg.critic)
            print(json.dumps({"policy": world.policy, "critic": world.critic, "prompts": world.prompts}, indent=1))
        elif args.command == "eval":
            from rlaif_ray.tools.evaluate import evaluate
            out = args.out or str(Path(args.checkpoint).resolve().parent / "eval")
            print(json.dumps(evaluate(cfg, args.checkpoint, args.reference, out, args.temperature), indent=1))
            print(f"written: {out}/eval.json, {out}/eval.png")
        elif args.command == "train-judge":
            from rlaif_ray.tools.train_judge import train_judge
            report = train_judge(cfg, args.preferences, args.out)
            print(json.dumps({k: report[k] for k in ("pairs", "epoch_losses", "held_out_before", "held_out_after")},
                             indent=1))
            print(f"tuned judge: {args.out} (judge_report.md; use it as model.critic={args.out})")
        elif args.command == "label":
            from rlaif_ray.tools.label import label_prompts
            print(json.dumps(label_prompts(cfg, args.out), indent=1))
        elif args.command == "serve":
            from rlaif_ray.serve.app import serve_forever
            return serve_forever(cfg, args.checkpoint, args.detach)
        elif args.command == "train":
            from rlaif_ray.console import run_summary_lines
            from rlaif_ray.runtime.driver import train
            from rlaif_ray.runtime.metrics import read_jsonl
            summary = train(cfg, resume=bool(args.resume))
            run_dir = cfg.output.run_dir
            print("\n".join(run_summary_lines(summary, read_jsonl(Path(run_dir) / "metrics.jsonl"), run_dir)))
    except (ConfigError, PromptFileError) as err:
        print(f"rlaif-ray: error: {err}", file=sys.stderr)
        return 2
    except RunStopped as err:
        print(f"rlaif-ray: run stopped: {err}", file=sys.stderr)
        return 1
    return 0


def _auto_resume(cfg) -> str | None:
    """`--resume auto`: the run folder `output.run_dir` when it holds a complete checkpoint (the run continues from
    the newest one, with the config given: a changed one is refused by name), else None (a fresh run, into a
    folder `output.existing` allows)."""
    from rlaif_ray.runtime import checkpoint
    found = checkpoint.latest(Path(cfg.output.run_dir))
    if found is None:
        print(f"[rlaif] --resume auto: no checkpoint in {cfg.output.run_dir}: starting the run", flush=True)
        return None
    print(f"[rlaif] --resume auto: continuing {cfg.output.run_dir} from {found.name}", flush=True)
    return cfg.output.run_dir


if __name__ == "__main__":
    sys.exit(main())
