"""A peer, side by side: the same task, models and reward run with TRL's GRPOTrainer and with rlaif_ray (sync and
async), same prompts at every step, samples per prompt, response length, temperature/top-p, learning rate and
schedule, KL coefficient and reward; prints one table (throughput, stage seconds, async stage efficiencies, compute
share of the machine's matmul peak) and writes OUT/peer_trl.json.

    python jobs/peer_trl.py -c jobs/configs/smol_cpu.yaml --steps 20 --warmup 2 --out runs/peer [overrides...]
    python jobs/peer_trl.py -c jobs/configs/toy_cpu.yaml --steps 40 --out runs/bench

TRL is installed for this benchmark only, into `.peer/` (pinned below, `pip install --target`, no dependencies:
torch and transformers are the project's own), and runs in a subprocess with that folder on PYTHONPATH, so the
project's environment never sees it.

Matching (`trl_settings`): one TRL optimizer step is one rlaif_ray step: `generation_batch_size` =
`per_device_train_batch_size` = prompts_per_step × samples_per_prompt (so steps_per_generation = 1 and gradient
accumulation 1), `num_generations` = samples_per_prompt, `max_completion_length` = rollout.max_new_tokens; TRL's
dataset is the prompts in the order rlaif_ray's PromptSampler draws them, unshuffled, so step k sees the same
prompts in both. The policy prompt is TRL's own chat templating of the row's conversation (the template
`rollout.chat_template` resolves to), checked here to give exactly the token ids rlaif_ray hands vLLM. The reward
is `rlaif_lab.peer.WinRateReward`: the labeler's judge prompts, pairs, both orders and win-rate arithmetic
(`tests/test_benchmark.py` checks it against CriticLabeler), judged by `TransformersJudge` (plain transformers
forward passes, the judge's chat template) behind the same judge cache rlaif_ray's labeler uses.
TRL generates with transformers `model.generate` on CPU, which is what a TRL user runs on this machine (its vLLM
path needs a vLLM server on a GPU or a colocated engine of a version it does not support yet); rlaif_ray with vLLM.

Figures are taken after `--warmup` steps. TRL's stage seconds come from wrapping its methods: `_generate` (prompt
tokenization, `model.generate`, decoding), the reward function (judge), `_get_per_token_logps_and_entropies` under
no_grad (the reference log-probs), the rest of `_generate_and_score_completions` (advantages, padding: "other"), and
the remainder of the optimizer step (loss forward, backward, optimizer: "train"). Model FLOPs: rlaif_lab.compute.
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
SCHEDULES = {"constant": "constant", "linear": "linear", "cosine": "cosine"}


def ensure_trl() -> None:
    marker = PEER_DIR / ".installed"
    if marker.exists() and marker.read_text() == " ".join(PEER_PACKAGES):
        return
    print(f"[peer] installing {' '.join(PEER_PACKAGES)} into {PEER_DIR}/ (this benchmark only)", flush=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--upgrade", "--no-deps", "--target", str(PEER_DIR),
                    *PEER_PACKAGES], check=True)
    marker.write_text(" ".join(PEER_PACKAGES))


def check_supported(cfg) -> str | None:
    """Why this comparison cannot run `cfg` (None: it can)."""
    if cfg.learner.algorithm != "ppo" or cfg.critic.method != "pairwise" or cfg.reward.kind != "win_rate":
        return ("the TRL comparison needs learner.algorithm=ppo, critic.method=pairwise and reward.kind=win_rate, got "
                f"{cfg.learner.algorithm}/{cfg.critic.method}/{cfg.reward.kind}")
    if cfg.learner.lora.rank or cfg.critic.remote.base_url:
        return "the TRL comparison runs the full model and a local judge (learner.lora.rank=0, no critic.remote)"
    return None


def trl_settings(cfg, steps: int, out: str) -> tuple[dict, list[str]]:
    """GRPOConfig keyword arguments matching `cfg`, and the settings that could not be matched (said in the output)."""
    lc, r = cfg.learner, cfg.rollout
    batch = cfg.data.prompts_per_step * r.samples_per_prompt
    schedule = SCHEDULES[lc.lr_schedule]
    if schedule == "constant" and lc.warmup_steps:
        schedule = "constant_with_warmup"
    kwargs = dict(per_device_train_batch_size=batch, generation_batch_size=batch, num_generations=r.samples_per_prompt,
                  max_completion_length=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p,
                  learning_rate=lc.learning_rate, lr_scheduler_type=schedule, warmup_steps=lc.warmup_steps,
                  weight_decay=lc.weight_decay, max_grad_norm=lc.grad_clip, beta=lc.kl(), epsilon=lc.clip_eps,
                  num_iterations=lc.ppo_epochs, loss_type="dapo" if lc.loss_aggregation == "token" else "grpo",
                  scale_rewards="group" if lc.advantage == "grpo" else "none",
                  mask_truncated_completions=r.truncated == "mask", gradient_checkpointing=lc.gradient_checkpointing,
                  max_steps=steps, seed=cfg.loop.seed, shuffle_dataset=False, remove_unused_columns=False,
                  use_vllm=False, bf16=cfg.model.dtype == "bfloat16", use_cpu=True, output_dir=str(Path(out) / "trl"),
                  logging_steps=10 ** 6, report_to="none", save_strategy="no", dataloader_num_workers=0,
                  disable_tqdm=True)
    deviations = ["TRL generates with transformers model.generate (CPU); rlaif_ray with vLLM engines",
                  f"TRL's judge runs transformers forward passes (TransformersJudge); rlaif_ray's judge "
                  f"critic.backend={cfg.critic.backend}: same judge token ids, label probabilities equal to ~1e-3",
                  "TRL: one process on all torch threads; rlaif_ray: one actor per stage, each with its CPUs",
                  "rlaif_ray's train stage holds the reference's no-grad pass (KL coefficient > 0) and, with "
                  "learner.ppo_epochs > 1, the before-update policy's; TRL's reference pass is its ref_logprobs row"]
    if r.top_p < 1:
        deviations.append(f"TRL's loss takes log π at the temperature without top-p; rlaif_ray's at temperature "
                          f"and top_p={r.top_p} (the distribution vLLM sampled from)")
    if lc.advantage in ("rloo", "reinforce_pp"):
        deviations.append(f"learner.advantage={lc.advantage} has no TRL equivalent: TRL subtracts the group mean")
    if lc.min_lr_ratio and lc.lr_schedule != "constant":
        deviations.append(f"learner.min_lr_ratio={lc.min_lr_ratio}: TRL's {schedule} schedule decays to 0")
    if r.truncated == "penalty":
        deviations.append("rollout.truncated=penalty: TRL keeps the judge's reward for cut-off answers")
    if cfg.critic.pairs != "all":
        deviations.append(f"critic.pairs={cfg.critic.pairs}: mirrored in TRL's reward (same pairs, same seeds)")
    return kwargs, deviations


def run_trl(cfg, steps: int, out: Path) -> dict:
    """Runs inside the subprocess (TRL importable): the TRL training run, per-step records."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from rlaif_ray.data.chat import PLAIN, conversation, engine_input, resolve_template
    from rlaif_ray.data.prompts import PromptSampler
    from rlaif_ray.judge.cache import CachedJudge
    from rlaif_ray.judge.local import TransformersJudge
    from rlaif_ray.runtime.inputs import resolve_inputs
    from rlaif_lab.peer import CountingJudge, WinRateReward

    resolved = resolve_inputs(cfg)  # also makes the judge's `auto` labels concrete, as the driver does
    torch.manual_seed(cfg.loop.seed)
    tok = AutoTokenizer.from_pretrained(resolved.policy)
    tok.padding_side = "left"
    template = resolve_template(cfg.rollout.chat_template, tok)
    if template is not PLAIN:
        tok.chat_template = template  # TRL renders with the tokenizer's template: make it the one the rollouts use
    rows = resolved.prompts.to_pylist()
    sampler = PromptSampler(len(rows), cfg.loop.seed, cfg.data.shuffle)  # rlaif_ray's prompt order, step by step
    order = [i for _ in range(steps + 1) for i in sampler.next_indices(cfg.data.prompts_per_step)]
    dataset = Dataset.from_list([{"prompt": rows[i]["prompt"] if template is PLAIN else conversation(rows[i]),
                                  "judge_prompt": rows[i]["prompt"], "prompt_id": rows[i]["prompt_id"]} for i in order])
    backend = CountingJudge(TransformersJudge(resolved.critic, cfg, cfg.loop.seed + 7919))
    judge = CachedJudge(backend, resolved.critic, cfg.critic.cache_size, cfg.critic.min_label_mass)
    reward = WinRateReward(judge, cfg.critic, cfg.loop.seed, backend)
    kwargs, _ = trl_settings(cfg, steps, str(out))
    policy = AutoModelForCausalLM.from_pretrained(resolved.policy, dtype=getattr(torch, cfg.model.dtype))
    trainer = GRPOTrainer(model=policy, reward_funcs=[reward], args=GRPOConfig(**kwargs), train_dataset=dataset,
                          processing_class=tok)

    ours = engine_input(tok, rows[order[0]], template)
    ours = ours["prompt_token_ids"] if isinstance(ours, dict) else tok.encode(ours)
    theirs = [int(t) for t in trainer._tokenize_prompts([dataset[0]["prompt"]])[0][0]]
    if ours != theirs:
        raise SystemExit(f"peer_trl: TRL's prompt ids differ from rlaif_ray's engine input:\n  rlaif_ray {ours}\n"
                         f"  TRL       {theirs}")
    prompt_check = {"identical": True, "tokens": len(ours), "text": tok.decode(ours)}

    current: dict = {}

    def timed(name: str, key: str, after=None, when=lambda: True):
        original = getattr(trainer, name)

        def wrapper(*args, **kw):
            if not when():
                return original(*args, **kw)
            t = time.perf_counter()
            result = original(*args, **kw)
            current[key] = current.get(key, 0.0) + time.perf_counter() - t
            if after:
                after(result)
            return result
        setattr(trainer, name, wrapper)

    def count_generation(result):
        prompt_ids, completion_ids = result[0], result[1]
        current.update(samples=len(completion_ids), gen_tokens=sum(len(c) for c in completion_ids),
                       prefill_tokens=sum({tuple(p): len(p) for p in prompt_ids}.values()),
                       train_tokens=sum(len(p) + len(c) for p, c in zip(prompt_ids, completion_ids)))

    timed("_generate", "gen", count_generation)
    timed("_generate_and_score_completions", "prepare")
    timed("_get_per_token_logps_and_entropies", "ref_logprobs", when=lambda: not torch.is_grad_enabled())
    records, t_last = [], [0.0]

    class StepClock(TrainerCallback):
        def on_step_end(self, *_, **__):
            now = time.perf_counter()
            calls = reward.calls[sum(r["reward_calls"] for r in records):]
            judge_s = sum(c["seconds"] for c in calls)
            gen, ref, prepare = current.get("gen", 0.0), current.get("ref_logprobs", 0.0), current.get("prepare", 0.0)
            records.append({"step_seconds": now - t_last[0], "samples": current.get("samples", 0),
                            "gen_tokens": current.get("gen_tokens", 0),
                            "prefill_tokens": current.get("prefill_tokens", 0),
                            "train_tokens": current.get("train_tokens", 0), "reward_calls": len(calls),
                            "judge_calls": sum(c["judge_calls"] for c in calls),
                            "judge_backend_prompts": sum(c["backend_prompts"] for c in calls),
                            "judge_backend_tokens": sum(c["backend_tokens"] for c in calls),
                            "unrewarded": sum(c["unrewarded"] for c in calls),
                            "stage_seconds": {"gen": gen, "judge": judge_s, "ref_logprobs": ref,
                                              "other": max(prepare - gen - judge_s - ref, 0.0),
                                              "train": max(now - t_last[0] - prepare, 0.0)}})
            t_last[0] = now
            current.clear()

    trainer.add_callback(StepClock())
    t0 = t_last[0] = time.perf_counter()
    trainer.train()
    return {"steps": records, "wall_seconds": time.perf_counter() - t0, "torch_threads": torch.get_num_threads(),
            "prompt_ids_check": prompt_check, "settings": kwargs}


def loop_flops_of(rows, tables, warmup: int, cfg, params: dict, count_tokens) -> dict:
    """Model FLOPs of an rlaif_ray run's measured steps (from metrics.jsonl rows and the saved tables)."""
    from rlaif_lab.compute import loop_flops
    from rlaif_lab.peer import loop_tokens

    totals = {"prefill_tokens": 0, "gen_tokens": 0, "judge_tokens": 0.0, "train_tokens": 0}
    for row, table in list(zip(rows, tables))[warmup:]:
        t = loop_tokens(table, cfg.critic, cfg.loop.seed, count_tokens)
        totals["prefill_tokens"] += t["prefill_tokens"]
        totals["gen_tokens"] += t["gen_tokens"]
        totals["train_tokens"] += t["train_tokens"] if row.get("optimizer_step", 1) else 0
        read = row.get("judge_calls", 0) - row.get("judge_cache_hits", 0)  # judge prompts the judge model read
        totals["judge_tokens"] += t["judge_prompt_tokens_mean"] * read
    return {"tokens": totals, "flops": loop_flops(params["policy"]["matmul"], params["judge"]["matmul"],
                                                  kl=cfg.learner.kl(), **totals)}


def main(argv=None) -> int:
    from rlaif_ray.config import ConfigError, load_config

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", "-c", default="jobs/configs/toy_cpu.yaml")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--out", default="runs/bench")
    parser.add_argument("--warmup", type=int, default=2, help="steps left out of the after-warm-up figures")
    parser.add_argument("--alone-steps", type=int, default=3,
                        help="measured steps (after --warmup) of each stage driven alone; 0: skip")
    parser.add_argument("--trl-only", action="store_true", help=argparse.SUPPRESS)  # the subprocess
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args(argv)  # overrides anywhere on the line
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"peer_trl: error: {err}", file=sys.stderr)
        return 2
    if (why := check_supported(cfg)) is not None:
        print(f"peer_trl: error: {why}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.trl_only:
        print("TRL_RESULT " + json.dumps(run_trl(cfg, args.steps, out)), flush=True)
        return 0
    return compare(cfg, args, out)


def compare(cfg, args, out: Path) -> int:
    import torch
    from transformers import AutoTokenizer

    from rlaif_ray.data.chat import resolve_template, user_turn_ids
    from rlaif_ray.runtime.driver import train
    from rlaif_ray.runtime.inputs import resolve_inputs
    from rlaif_ray.runtime.metrics import read_jsonl
    from rlaif_lab.benchmark import run_figures
    from rlaif_lab.compute import flop_share, loop_flops, matmul_params, matmul_peak
    from rlaif_lab.peer import format_peer_table, trl_figures
    from rlaif_lab.stage_alone import measure_alone, saved_tables

    peaks = [matmul_peak()]  # fp32, all of torch's threads; again at the end, the higher one counts
    print(f"[peer] matmul peak fp32, {torch.get_num_threads()} threads: {peaks[0] / 1e9:.1f} GFLOP/s", flush=True)
    resolved = resolve_inputs(cfg)  # the judge's `auto` labels made concrete in cfg.critic
    params = {"policy": matmul_params(resolved.policy), "judge": matmul_params(resolved.critic)}
    _, deviations = trl_settings(cfg, args.steps, str(out))

    ensure_trl()
    path = os.pathsep.join(filter(None, [str(PEER_DIR.resolve()), os.environ.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, __file__, "--trl-only", "-c", args.config, "--steps", str(args.steps),
                           "--warmup", str(args.warmup), "--out", str(out), *args.overrides],
                          env={**os.environ, "PYTHONPATH": path}, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("TRL_RESULT ")]
    if proc.returncode or not lines:
        print(proc.stdout[-3000:], proc.stderr[-5000:], sep="\n", file=sys.stderr)
        print(f"peer_trl: error: the TRL run failed (exit {proc.returncode})", file=sys.stderr)
        return 1
    trl_run = json.loads(lines[-1].removeprefix("TRL_RESULT "))
    check = trl_run["prompt_ids_check"]
    print(f"[peer] policy prompt ids identical in TRL and rlaif_ray ({check['tokens']} tokens): {check['text']!r}",
          flush=True)
    trl = trl_figures(trl_run["steps"], args.warmup)
    t = trl["totals"]
    trl["flops"] = flop_share(loop_flops(params["policy"]["matmul"], params["judge"]["matmul"], kl=cfg.learner.kl(),
                                         prefill_tokens=t["prefill_tokens"], gen_tokens=t["gen_tokens"],
                                         judge_tokens=t["judge_backend_tokens"], train_tokens=t["train_tokens"]),
                              trl["wall_seconds"], 1.0)
    print(f"[peer] TRL GRPOTrainer: {trl['samples_per_s']:.2f} samples/s after warm-up "
          f"({trl_run['wall_seconds']:.1f} s)", flush=True)

    judge_tok = AutoTokenizer.from_pretrained(resolved.critic)
    judge_template = resolve_template(cfg.critic.chat_template, judge_tok, "critic.chat_template")

    def count_tokens(texts):
        return [len(user_turn_ids(judge_tok, text, judge_template)) for text in texts]

    ours, runs = {}, {}
    for mode in ("sync", "async"):
        run = cfg.model_copy(deep=True)
        run.loop.mode, run.loop.num_steps = mode, args.steps
        run.loop.max_inflight = 0 if mode == "sync" else max(1, cfg.loop.max_inflight)
        run.output.run_dir, run.output.progress, run.output.save_checkpoint = str(out / f"peer_{mode}"), False, False
        run.output.existing = "overwrite"  # this job's own subfolder
        run.output.save_labels = True      # the token counts (FLOPs) and the stage-alone batches
        run.loop.eval_samples = 0
        summary = train(run)
        rows = read_jsonl(out / f"peer_{mode}" / "metrics.jsonl")
        figures = run_figures(rows, warmup=args.warmup)
        counted = loop_flops_of(rows, saved_tables(run.output.run_dir), args.warmup, cfg, params, count_tokens)
        figures.update(tokens=counted["tokens"], flops=flop_share(counted["flops"], figures["wall_seconds"], 1.0),
                       samples_per_s_all_steps=summary["samples_per_s"], run_wall_seconds=summary["wall_seconds"],
                       startup_seconds=summary["startup_seconds"])
        figures["stage_seconds"] = {("judge" if k == "label" else k): v for k, v in figures["stage_seconds"].items()}
        ours[mode], runs[mode] = figures, run
        print(f"[peer] rlaif_ray {mode}: {figures['samples_per_s']:.2f} samples/s after warm-up", flush=True)

    alone = {}
    if args.alone_steps > 0:
        alone = measure_alone(runs["async"], resolved, runs["async"].output.run_dir, args.warmup, args.alone_steps)
    peaks.append(matmul_peak())
    peak = max(peaks)
    systems = {"TRL": trl, "rlaif_ray sync": ours["sync"], "rlaif_ray async": ours["async"]}
    for s in systems.values():  # FLOP/s were taken against a peak of 1: now the measured one
        s["flops"]["share_of_peak"] = {k: v / peak for k, v in s["flops"]["flops_per_s"].items()}
    table = format_peer_table(systems, alone.get("efficiency", {}))
    print("\n" + table)
    print(f"\nafter {args.warmup} warm-up steps of {args.steps}; matmul peak fp32 {peak / 1e9:.1f} GFLOP/s "
          f"(measured {', '.join(f'{p / 1e9:.1f}' for p in peaks)}); N = matmul parameters (all but the input "
          f"embedding lookup; tied head counted): policy {params['policy']['matmul'] / 1e6:.1f}M, "
          f"judge {params['judge']['matmul'] / 1e6:.1f}M; TRL torch threads {trl_run['torch_threads']}")
    print("not matched / not comparable:\n  - " + "\n  - ".join(deviations))
    key = "samples_per_s"
    result = {"config": args.config, "overrides": args.overrides, "steps": args.steps, "warmup": args.warmup,
              "packages": PEER_PACKAGES, "matmul_peak_flops": peak, "matmul_peaks_measured": peaks, "params": params,
              "trl": {**trl, "run": trl_run}, "rlaif_ray": ours, "stage_alone": alone, "deviations": deviations,
              "ratio_async_over_trl": ours["async"][key] / trl[key] if trl[key] else None,
              "ratio_sync_over_trl": ours["sync"][key] / trl[key] if trl[key] else None, "target_async_over_trl": 1.5,
              "table": table}
    (out / "peer_trl.json").write_text(json.dumps(result, indent=1, default=str))
    print(f"written: {out / 'peer_trl.json'}")
    return 0


if __name__ == "__main__":  # vLLM on CPU spawns processes: keep the guard
    sys.exit(main())
