"""Model FLOPs and the machine's matmul peak: what a loop's compute share is measured against (jobs/peer_trl.py,
jobs/gpu_learner_check.py).

Model FLOPs count the useful work of the model, whichever system does it (MFU conventions: no recomputation, no
padding, no duplicate prefill), with N the matmul parameters of a model (`matmul_params`: every parameter but the
input-embedding lookup; a tied output head is the embedding matrix used as a matmul, so it is counted):
- generation: 2·N per generated token, plus 2·N per prompt token once per prompt (the prefill);
- judge: 2·N_judge per judge-prompt token the judge model actually read (cache hits read nothing);
- learner: 6·N per trained token (prompt + response: the forward and backward run over the whole sequence), plus
  2·N per trained token for the frozen reference's forward when the KL coefficient is above 0.
"""
from __future__ import annotations

import time


def matmul_peak(device=None, dtype=None, n: int = 2048) -> float:
    """FLOP/s of an n×n×n matmul on `device` (CPU: torch's own threads, all of them by default) in `dtype` (fp32 by
    default), best of 3 after a warm-up."""
    import torch
    device = torch.device("cpu") if device is None else device
    dtype = torch.float32 if dtype is None else dtype
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for k in range(4):
        _sync(device)
        t = time.perf_counter()
        a @ b
        _sync(device)
        if k:
            best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


def _sync(device) -> None:
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_params(model_path: str) -> dict:
    """Parameter counts of a Hugging Face model folder, built on the meta device (no weights read): `total` (unique
    parameters), `embedding` (the input embedding), `matmul` (N of the FLOP counts: total less the embedding lookup,
    unless the output head is tied to it)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())  # parameters() yields a tied matrix once
    embedding = model.get_input_embeddings().weight.numel()
    tied = model.get_output_embeddings() is not None and \
        model.get_output_embeddings().weight is model.get_input_embeddings().weight
    return {"total": int(total), "embedding": int(embedding), "tied_head": bool(tied),
            "matmul": int(total if tied else total - embedding)}


def loop_flops(n_policy: int, n_judge: int, *, prefill_tokens: float, gen_tokens: float, judge_tokens: float,
               train_tokens: float, kl: float) -> dict:
    """Model FLOPs of one stretch of a loop (any token totals: per step or summed), per stage and in all."""
    out = {"gen": 2.0 * n_policy * (prefill_tokens + gen_tokens),
           "judge": 2.0 * n_judge * judge_tokens,
           "learner": (6.0 + (2.0 if kl > 0 else 0.0)) * n_policy * train_tokens}
    out["total"] = sum(out.values())
    return out


def flop_share(flops: dict, seconds: float, peak: float) -> dict:
    """Model FLOP/s of each stage over `seconds` of wall time, and its share of the matmul `peak` (FLOP/s)."""
    rate = {k: v / seconds if seconds else 0.0 for k, v in flops.items()}
    return {"flops_per_s": rate, "share_of_peak": {k: v / peak if peak else 0.0 for k, v in rate.items()}}
