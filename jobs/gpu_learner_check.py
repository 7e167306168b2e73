"""The learner's core alone (rlaif_ray.learner_core: no Ray, no vLLM, no network): peak memory, step time and model
FLOP utilisation of one PPO step per variant, each variant in a fresh process, side by side in one run.

On a GPU host (torch, transformers, peft, DeepSpeed with its pydantic, and CUDA; where DeepSpeed is missing it
travels as a wheel built here with `pip wheel --no-deps deepspeed==0.19.8`; no Ray, no vLLM, no network):

    python jobs/gpu_learner_check.py                      # ~0.5B Qwen2.5-shaped model, random weights, bf16

runs ZeRO-2 and ZeRO-3 on one rank, gradient checkpointing off and on, chunked log-probs, and LoRA (16 × 2048
tokens a step, 3 timed steps after a warm-up, each variant in a fresh process: sized for a few minutes on one GPU,
never run on one yet). On this repo's CPU machines the same script measures the smol model (docs/performance.md's
learner-memory table):

    python jobs/gpu_learner_check.py --model smol --rows 8 --prompt-tokens 64 --response-tokens 64

Memory: on a GPU the peak allocated during the timed steps and, of it, the peak before the optimizer update (the
log-prob passes, forward and backward); on a CPU the same two read from the process's resident set (polled every
5 ms, allocations over 64 KB mapped on their own so that freed tensors leave it), above the resting RSS after the
warm-up step (model, reference, optimizer state). One step = what LearnerRank does per batch: the no-grad
log-probs of the policy before the update and of the reference, then forward + backward + optimizer step. Model FLOPs per step: 2·N·T for each no-grad forward and 6·N·T
for the training pass (N non-embedding parameters + the output head, T tokens; recomputation from checkpointing is
not counted, as MFU conventions go); MFU = model FLOP/s over the matmul peak measured on the same device in the same
run (bf16 or fp32, the training dtype).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VARIANTS = {  # name -> CoreSettings overrides
    "zero2": {"zero_stage": 2, "logprob_chunk_tokens": 0},
    "zero2_ckpt": {"zero_stage": 2, "logprob_chunk_tokens": 0, "gradient_checkpointing": True},
    "zero2_chunked": {"zero_stage": 2, "logprob_chunk_tokens": 1024},
    "zero2_ckpt_chunked": {"zero_stage": 2, "logprob_chunk_tokens": 1024, "gradient_checkpointing": True},
    "zero3": {"zero_stage": 3, "logprob_chunk_tokens": 0, "reference": "sharded"},
    "zero3_ckpt_chunked": {"zero_stage": 3, "logprob_chunk_tokens": 1024, "gradient_checkpointing": True,
                           "reference": "sharded"},
    "lora": {"zero_stage": 2, "logprob_chunk_tokens": 1024, "lora_rank": 16, "lora_alpha": 32.0,
             "reference": "adapter"},
    "zero2_ckpt_chunked_noref": {"zero_stage": 2, "logprob_chunk_tokens": 1024, "gradient_checkpointing": True,
                                 "reference": "none"},
    "zero3_ckpt_chunked_noref": {"zero_stage": 3, "logprob_chunk_tokens": 1024, "gradient_checkpointing": True,
                                 "reference": "none"},
    "lora_ckpt": {"zero_stage": 2, "logprob_chunk_tokens": 1024, "lora_rank": 16, "lora_alpha": 32.0,
                  "reference": "adapter", "gradient_checkpointing": True},
}
CPU_VARIANTS = "zero2,zero2_ckpt,zero2_chunked,zero2_ckpt_chunked,zero3_ckpt_chunked,lora"


def qwen_half_b_config():
    """A Qwen2.5-0.5B-shaped Llama config (494M parameters with its 151,936-token vocabulary, tied embeddings)."""
    from transformers import LlamaConfig
    return LlamaConfig(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                       num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=4096,
                       tie_word_embeddings=True, rms_norm_eps=1e-6, rope_theta=1e6)


# Qwen2.5-shaped Llama configs (random weights): hidden, intermediate, layers, heads, KV heads, tied embeddings
QWEN_SHAPES = {"qwen1.5b": (1536, 8960, 28, 12, 2, True), "qwen3b": (2048, 11008, 36, 16, 2, True),
               "qwen7b": (3584, 18944, 28, 28, 4, False)}


def model_source(name: str):
    if name == "qwen0.5b":
        return qwen_half_b_config()
    if name in QWEN_SHAPES:
        from transformers import LlamaConfig
        hidden, inter, layers, heads, kv, tied = QWEN_SHAPES[name]
        return LlamaConfig(vocab_size=151936, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                           num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=4096,
                           tie_word_embeddings=tied, rms_norm_eps=1e-6, rope_theta=1e6)
    if name == "tiny":  # a few seconds per variant anywhere: the script's own test
        from transformers import LlamaConfig
        return LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True)
    if name == "smol":
        from rlaif_ray.config import SmolWorldConfig
        from rlaif_ray.worlds.smol import build_smol_world
        return build_smol_world(SmolWorldConfig()).model
    return name  # a Hugging Face folder


class RssPeak:
    """The highest resident set size of this process while it runs (polled every 5 ms from /proc), in GB: a CPU
    stand-in for torch.cuda.max_memory_allocated (tensors of a few MB and up are mmapped, so freeing them shows)."""

    def __enter__(self):
        import threading
        self.peak, self.stop = 0.0, threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()
        return self

    def _poll(self):
        page = os.sysconf("SC_PAGE_SIZE")
        while not self.stop.is_set():
            with open("/proc/self/statm") as f:
                self.peak = max(self.peak, int(f.read().split()[1]) * page / 1e9)
            self.stop.wait(0.005)

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def rss_gb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e9


def sync(device) -> None:
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize()


def child(spec: dict) -> dict:
    """One variant in this process: build, warm up, time `steps` PPO steps; memory and FLOPs."""
    import torch

    from rlaif_ray import algorithms
    from rlaif_ray.learner_core import CoreSettings, LearnerCore, init_distributed
    from rlaif_lab.compute import matmul_peak
    from rlaif_ray.weight_transfer import layout_bytes

    gpu = torch.cuda.is_available()
    init_distributed("nccl" if gpu else "gloo", "127.0.0.1", spec["port"], 0, 1)
    device = torch.device("cuda", 0) if gpu else torch.device("cpu")
    variant = dict(VARIANTS[spec["variant"]])
    if variant["logprob_chunk_tokens"]:
        variant["logprob_chunk_tokens"] = spec["chunk_tokens"]
    settings = CoreSettings(dtype=spec["dtype"], learning_rate=1e-5, seed=0, total_steps=10, **variant)
    t_build = time.perf_counter()
    core = LearnerCore(model_source(spec["model"]), settings, device)
    t_build = time.perf_counter() - t_build
    config = core.engine.module.config
    vocab, rows = config.vocab_size, spec["rows"]
    p_len, r_len = spec["prompt_tokens"], spec["response_tokens"]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (rows, p_len + r_len), generator=g).to(device)
    attn = torch.ones_like(ids)
    resp = torch.zeros(rows, p_len + r_len - 1, device=device)
    resp[:, p_len - 1:] = 1.0
    adv = torch.linspace(-1, 1, rows, device=device)
    sampling = {"temperature": 1.0, "top_p": 1.0}

    def step() -> float:
        with torch.no_grad():
            prox = core.logprobs(ids, attn, **sampling)
            ref = core.logprobs(ids, attn, **sampling, reference=True) if settings.reference != "none" else None
        losses = []

        def loss_of(_):
            logp = core.logprobs(ids, attn, **sampling)
            per_sample, *_ = core.ppo_loss(logp, prox, prox, resp, adv, ref, 0.2, 2.0, 0.05 if ref is not None else 0.0)
            losses.append(float(per_sample.detach().mean()))
            return per_sample.mean()
        core.train_passes(1, 1, loss_of)
        return losses[0]

    step()  # warm-up (allocator, kernels, optimizer state)
    sync(device)
    if gpu:
        resting_gpu = torch.cuda.memory_allocated() / 1e9
        torch.cuda.reset_peak_memory_stats()
    times, resting, before_update = [], rss_gb(), []
    optimizer_step = core.engine.step

    def step_and_mark():  # the highest RSS of the log-prob passes, forward and backward, before the update
        before_update.append(torch.cuda.max_memory_allocated() / 1e9 if gpu else rss.peak)
        optimizer_step()
    core.engine.step = step_and_mark
    with RssPeak() as rss:
        for _ in range(spec["steps"]):
            t = time.perf_counter()
            loss = step()
            sync(device)
            times.append(time.perf_counter() - t)
    lm = core.engine.module
    full = sum(int(getattr(p, "ds_numel", p.numel())) for n, p in lm.named_parameters() if "lora_" not in n)
    embed = int(config.vocab_size * config.hidden_size)
    # matmul parameters: all but the input embedding (a lookup); a tied output head is the embedding again
    n_matmul = full if config.tie_word_embeddings else full - embed
    tokens = rows * (p_len + r_len)
    flops = 10 * n_matmul * tokens
    step_s = sorted(times)[len(times) // 2]
    dtype = getattr(torch, spec["dtype"])
    peak = matmul_peak(device, dtype, 8192 if gpu else 2048)
    out = {"variant": spec["variant"], "device": torch.cuda.get_device_name(0) if gpu else "cpu",
           "dtype": spec["dtype"], "params": full, "tokens_per_step": tokens, "build_s": round(t_build, 1),
           "step_s": round(step_s, 3), "tokens_per_s": round(tokens / step_s, 1), "loss": round(loss, 5),
           "model_tflops": round(flops / step_s / 1e12, 3), "matmul_peak_tflops": round(peak / 1e12, 2),
           "mfu": round(flops / step_s / peak, 4),
           "weights_gb": round(layout_bytes(core.layout()) / 1e9, 2)}
    out["modules_loaded"] = sorted({m.split(".")[0] for m in sys.modules} & {"ray", "vllm"})
    if gpu:
        out["peak_gpu_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
    out["resting_rss_gb"] = round(resting, 2)  # model, reference, optimizer state after the warm-up step
    out["step_rss_peak_gb"] = round(rss.peak, 2)  # the highest RSS during the timed steps
    out["step_rss_added_gb"] = round(rss.peak - resting, 2)  # what one step adds on top
    if gpu:
        out["resting_gpu_gb"] = round(resting_gpu, 2)
        out["fwd_bwd_peak_gpu_gb"] = round(max(before_update), 2)  # the log-prob passes and backward, before the update
    else:
        out["fwd_bwd_rss_added_gb"] = round(max(before_update) - resting, 2)  # of the step's peak, before the update
    return out


def main(argv=None) -> None:
    import torch
    gpu = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen0.5b",
                    help=f"qwen0.5b, {', '.join(QWEN_SHAPES)} (random weights) | smol | tiny (random) | a Hugging Face folder")
    ap.add_argument("--variants", default=",".join(VARIANTS) if gpu else CPU_VARIANTS,
                    help=f"comma-separated, from: {', '.join(VARIANTS)}")
    ap.add_argument("--dtype", default="bfloat16" if gpu else "float32")
    ap.add_argument("--rows", type=int, default=16 if gpu else 8)
    ap.add_argument("--prompt-tokens", type=int, default=512 if gpu else 64)
    ap.add_argument("--response-tokens", type=int, default=1536 if gpu else 64)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--chunk-tokens", type=int, default=1024 if gpu else 256,
                    help="positions per output-head chunk in the chunked variants")
    ap.add_argument("--out", default=None, help="also write the results as JSON lines here")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(child(json.loads(args.child))), flush=True)
        return
    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variant(s) {unknown}; known: {', '.join(VARIANTS)}")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if not gpu:  # every allocation over 64 KB its own mapping: freed tensors leave the RSS at once, so the RSS peak
        env.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")  # measures live memory (glibc keeps smaller frees cached)
    results = []
    for k, variant in enumerate(args.variants.split(",")):
        spec = {"variant": variant, "model": args.model, "dtype": args.dtype, "rows": args.rows,
                "prompt_tokens": args.prompt_tokens, "response_tokens": args.response_tokens, "steps": args.steps,
                "chunk_tokens": args.chunk_tokens,
                "port": 29500 + os.getpid() % 1000 + k}
        print(f"[check] {variant} ...", flush=True)
        proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], env=env,
                              capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-12:]
            print(f"[check] {variant} FAILED (exit {proc.returncode}):\n  " + "\n  ".join(tail), flush=True)
            results.append({"variant": variant, "error": tail[-1] if tail else f"exit {proc.returncode}"})
            continue
        results.append(json.loads(lines[-1][len("RESULT "):]))
        print("[check] " + json.dumps(results[-1]), flush=True)
    memory = "peak_gpu_gb" if gpu else "step_rss_added_gb"
    second = "fwd_bwd_peak_gpu_gb" if gpu else "fwd_bwd_rss_added_gb"
    print(f"\n{'variant':22} {'step s':>8} {'tokens/s':>10} {memory:>18} {second:>21} {'MFU':>7} {'loss':>9}")
    for r in results:
        if "error" in r:
            print(f"{r['variant']:22} failed: {r['error']}")
        else:
            print(f"{r['variant']:22} {r['step_s']:8.3f} {r['tokens_per_s']:10.1f} {r[memory]:18.2f} "
                  f"{r[second]:21.2f} {r['mfu']:7.3f} {r['loss']:9.5f}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in results))
    if any("error" in r for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
