"""A peer, side by side: the same toy task, models and reward run with TRL's GRPOTrainer and with rlaif_ray
(sync and async), same prompts per step, samples per prompt, response length, learning rate and KL
coefficient; prints samples/s of each and the ratios, writes OUT/peer_trl.json.

    python jobs/peer_trl.py -c jobs/configs/toy_cpu.yaml --steps 40 --out runs/bench [overrides...]

TRL is installed for this benchmark only, into `.peer/` (pinned below, `pip install --target`, no
dependencies: torch and transformers are the project's own), and runs in a subprocess with that folder on
PYTHONPATH, so the project's environment never sees it. The reward in TRL is the same pairwise AI feedback:
a reward function that judges every pair of a prompt's completions in both orders with the toy critic
(transformers forward passes, the exact judge strings rlaif_ray builds) and returns 2·mean P(win) − 1 per
completion, which is rlaif_ray's `reward.kind=win_rate`. TRL generates with `model.generate` (its vLLM path
needs a GPU server or a colocated engine of a version it does not support yet); rlaif_ray with vLLM.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

PEER_PACKAGES = ["trl==1.16.0", "accelerate==1.15.0", "datasets==5.2.0", "xxhash==4.1.0", "multiprocess==0.70.19"]
PEER_DIR = Path(".peer")


def ensure_trl() -> None:
    marker = PEER_DIR / ".installed"
    if marker.exists() and marker.read_text() == " ".join(PEER_PACKAGES):
        return
    print(f"[peer] installing {' '.join(PEER_PACKAGES)} into {PEER_DIR}/ (this benchmark only)", flush=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--upgrade", "--no-deps", "--target", str(PEER_DIR),
                    *PEER_PACKAGES], check=True)
    marker.write_text(" ".join(PEER_PACKAGES))


def pairwise_win_rate_reward(critic_path: str, critic_cfg, samples_per_prompt: int):
    """A TRL reward function: per prompt group, every pair judged in both orders; reward 2·mean P(win) − 1."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlaif_ray.judge.reply import concrete_labels, label_token_ids
    from rlaif_ray.judge.templates import JudgePrompts

    tok = AutoTokenizer.from_pretrained(critic_path)
    critic_cfg = concrete_labels(critic_cfg, tok)
    model = AutoModelForCausalLM.from_pretrained(critic_path, dtype=torch.float32).eval()
    labels = label_token_ids(tok, critic_cfg.pairwise_labels, critic_path)
    judge = JudgePrompts(critic_cfg)

    def reward(prompts, completions, **_):
        n = len(completions)
        jobs = []  # (i, j, text): P(slot 1) of "i in slot 1, j in slot 2"
        for start in range(0, n, samples_per_prompt):
            group = range(start, min(start + samples_per_prompt, n))
            for i in group:
                for j in group:
                    if i != j:
                        jobs.append((i, j, judge.pairwise(prompts[i], completions[i], completions[j]) + critic_cfg.pairwise_ending))
        enc = [tok.encode(text) for _, _, text in jobs]
        width = max(len(e) for e in enc)
        ids = torch.full((len(enc), width), tok.pad_token_id or 0)
        mask = torch.zeros_like(ids)
        for k, e in enumerate(enc):
            ids[k, :len(e)], mask[k, :len(e)] = torch.tensor(e), 1
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits
        last = logits[torch.arange(len(enc)), mask.sum(1) - 1][:, labels]
        p_first = torch.softmax(last, -1)[:, 0].tolist()
        wins = [[] for _ in range(n)]
        for (i, j, _), p in zip(jobs, p_first):  # order (i, j): i wins with p; j loses with p
            wins[i].append(p)
            wins[j].append(1.0 - p)
        return [2.0 * sum(w) / len(w) - 1.0 if w else 0.0 for w in wins]

    return reward


def run_trl(cfg, steps: int, out: Path, warmup: int) -> dict:
    """Runs inside the subprocess (TRL importable)."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from rlaif_ray.runtime.inputs import resolve_inputs

    resolved = resolve_inputs(cfg)
    torch.manual_seed(cfg.loop.seed)
    tok = AutoTokenizer.from_pretrained(resolved.policy)
    tok.padding_side = "left"
    rows = resolved.prompts.select(["prompt"]).to_pylist()
    per_step = cfg.data.prompts_per_step * cfg.rollout.samples_per_prompt
    dataset = Dataset.from_list(rows * ((steps * cfg.data.prompts_per_step) // len(rows) + 2))
    args = GRPOConfig(output_dir=str(out / "trl"), per_device_train_batch_size=per_step,
                      num_generations=cfg.rollout.samples_per_prompt, max_completion_length=cfg.rollout.max_new_tokens,
                      temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p, learning_rate=cfg.learner.learning_rate,
                      beta=cfg.learner.kl(), max_steps=steps, logging_steps=10 ** 6, report_to="none", use_cpu=True,
                      save_strategy="no", seed=cfg.loop.seed, use_vllm=False, bf16=False, dataloader_num_workers=0,
                      disable_tqdm=True)
    trainer = GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(resolved.policy, dtype=torch.float32),
                          reward_funcs=pairwise_win_rate_reward(resolved.critic, cfg.critic, cfg.rollout.samples_per_prompt),
                          args=args, train_dataset=dataset, processing_class=tok)
    ends = []

    class StepClock(TrainerCallback):
        def on_step_end(self, *_, **__):
            ends.append(time.perf_counter())

    trainer.add_callback(StepClock())
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    measured = ends[warmup - 1:] if warmup else [t0, *ends]  # the clock starts at the end of the warm-up steps
    return {"steps": steps, "samples": steps * per_step, "wall_seconds": wall, "samples_per_s": steps * per_step / wall,
            "samples_per_s_after_warmup": (len(measured) - 1) * per_step / (measured[-1] - measured[0]),
            "torch_threads": torch.get_num_threads()}


def main(argv=None) -> int:
    from rlaif_ray.config import ConfigError, load_config

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", "-c", default="jobs/configs/toy_cpu.yaml")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--out", default="runs/bench")
    parser.add_argument("--warmup", type=int, default=2, help="steps left out of the after-warm-up figures")
    parser.add_argument("--trl-only", action="store_true", help=argparse.SUPPRESS)  # the subprocess
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args(argv)  # overrides anywhere on the line
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"peer_trl: error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.trl_only:
        print("TRL_RESULT " + json.dumps(run_trl(cfg, args.steps, out, args.warmup)), flush=True)
        return 0

    ensure_trl()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(PEER_DIR.resolve()), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, __file__, "--trl-only", "-c", args.config, "--steps", str(args.steps),
                           "--warmup", str(args.warmup), "--out", str(out), *args.overrides], env=env, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("TRL_RESULT ")]
    if proc.returncode or not lines:
        print(proc.stdout[-3000:], proc.stderr[-5000:], sep="\n", file=sys.stderr)
        print(f"peer_trl: error: the TRL run failed (exit {proc.returncode})", file=sys.stderr)
        return 1
    trl = json.loads(lines[-1].removeprefix("TRL_RESULT "))
    print(f"[peer] TRL GRPOTrainer: {trl['samples_per_s']:.1f} samples/s ({trl['steps']} steps, {trl['wall_seconds']:.1f} s)",
          flush=True)

    from rlaif_ray.runtime.driver import train
    from rlaif_ray.runtime.metrics import read_jsonl
    from rlaif_ray.tools.benchmark import run_figures

    ours = {}
    for mode in ("sync", "async"):
        run = cfg.model_copy(deep=True)
        run.loop.mode, run.loop.num_steps = mode, args.steps
        run.loop.max_inflight = 0 if mode == "sync" else max(1, cfg.loop.max_inflight)
        run.output.run_dir, run.output.progress, run.output.save_checkpoint = str(out / f"peer_{mode}"), False, False
        run.output.existing = "overwrite"  # this job's own subfolder
        run.loop.eval_samples = 0
        summary = train(run)
        figures = run_figures(read_jsonl(out / f"peer_{mode}" / "metrics.jsonl"), warmup=args.warmup)
        ours[mode] = {"samples_per_s": summary["samples_per_s"], "wall_seconds": summary["wall_seconds"],
                      "samples_per_s_after_warmup": figures["samples_per_s"]}
        print(f"[peer] rlaif_ray {mode}: {ours[mode]['samples_per_s']:.1f} samples/s", flush=True)
    key = "samples_per_s_after_warmup"
    result = {"config": args.config, "overrides": args.overrides, "steps": args.steps, "warmup": args.warmup,
              "trl": trl, "rlaif_ray": ours, "packages": PEER_PACKAGES,
              "ratio_async_over_trl": ours["async"][key] / trl[key], "ratio_sync_over_trl": ours["sync"][key] / trl[key],
              "ratio_async_over_trl_all_steps": ours["async"]["samples_per_s"] / trl["samples_per_s"]}
    print(f"\n{'':24s}{'samples/s':>12s}{'after warm-up':>15s}{'wall s':>9s}")
    for name, r in (("TRL GRPOTrainer", trl), ("rlaif_ray sync", ours["sync"]), ("rlaif_ray async", ours["async"])):
        print(f"{name:24s}{r['samples_per_s']:12.1f}{r[key]:15.1f}{r['wall_seconds']:9.1f}")
    print(f"\nafter {args.warmup} warm-up steps: rlaif_ray async / TRL {result['ratio_async_over_trl']:.2f}x, "
          f"sync / TRL {result['ratio_sync_over_trl']:.2f}x (model loading and actor start-up excluded on both sides)")
    (out / "peer_trl.json").write_text(json.dumps(result, indent=1))
    print(f"written: {out / 'peer_trl.json'}")
    return 0


if __name__ == "__main__":  # vLLM on CPU spawns processes: keep the guard
    sys.exit(main())
