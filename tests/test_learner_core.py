"""The learner's core without Ray or vLLM (rlaif_ray.learner_core): chunked log-probs equal the plain ones (values and
gradients), gradient checkpointing gives the same loss and gradient norm, LoRA exports merged weights under the base
model's names, and the learning-rate schedules."""
from __future__ import annotations

import pytest
import torch

from rlaif_ray import algorithms
from rlaif_ray.learner_core import CoreSettings, LearnerCore, chunked_logprobs, init_distributed, lr_factor
from tests.conftest import free_port


@pytest.fixture(scope="module")
def process_group():
    """A one-rank gloo group in this process (DeepSpeed needs one; it lives until the session ends)."""
    if not torch.distributed.is_initialized():
        init_distributed("gloo", "127.0.0.1", free_port(), 0, 1)


def batch(vocab: int, rows: int = 3, width: int = 23, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (rows, width), generator=g)
    attn = torch.ones_like(ids)
    attn[1, width - 5:] = 0  # a padded row
    resp = torch.zeros(rows, width - 1)
    resp[:, 8:] = 1.0
    resp[1, width - 6:] = 0.0
    return ids, attn, resp


@pytest.mark.parametrize("world", ["toy", "smol"])
def test_chunked_logprobs_equal_plain(request, world):
    from transformers import AutoModelForCausalLM
    path = request.getfixturevalue(f"{world}_world").policy if world == "toy" else \
        request.getfixturevalue("smol_world").model
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ids, attn, resp = batch(model.config.vocab_size)
    for temperature, top_p in ((1.0, 1.0), (0.7, 0.9)):
        grads = []
        values = []
        for chunk in (0, 7):  # 7 positions per chunk: several chunks and a ragged last one
            model.zero_grad()
            head_calls = []
            hook = model.get_output_embeddings().register_forward_pre_hook(lambda *_: head_calls.append(1))
            lp = chunked_logprobs(model, ids, attn, temperature, top_p, chunk_tokens=chunk)
            # the output head ran once on the whole batch, or once per chunk of 7 of the 66 positions
            assert len(head_calls) == (1 if chunk == 0 else 10)
            (lp * resp).sum().backward()
            hook.remove()
            values.append(lp.detach())
            grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
        assert values[0].shape == (3, 22)
        torch.testing.assert_close(values[1], values[0], rtol=1e-5, atol=1e-5)
        # the same gradient up to float summation order (a token at the edge of the top-p nucleus may round to the
        # other side in one of the two)
        assert grads[0].norm() > 0 and float((grads[1] - grads[0]).norm() / grads[0].norm()) < 1e-3


def ppo_step(core: LearnerCore, ids, attn, resp):
    """One PPO update on a fixed batch through the core; (loss, gradient norm before clipping)."""
    adv = torch.tensor([1.0, -0.5, -0.5])
    with torch.no_grad():
        prox = core.logprobs(ids, attn, 0.7, 0.9)
        ref = core.logprobs(ids, attn, 0.7, 0.9, reference=True)
    behav = prox.clone()
    losses = []

    def loss_of(k):
        logp = core.logprobs(ids, attn, 0.7, 0.9)
        per_sample, *_ = core.ppo_loss(logp, prox, behav, resp, adv, ref, 0.2, 2.0, 0.05)
        losses.append(float(per_sample.detach().sum()))
        return per_sample.sum()
    core.train_passes(1, 1, loss_of)
    return losses[0], core.grad_norm()


def test_gradient_checkpointing_gives_the_same_loss_and_gradient(process_group, toy_world):
    ids, attn, resp = batch(256)
    results, layer_calls = {}, {}
    for on in (False, True):
        settings = CoreSettings(zero_stage=2, learning_rate=0.01, gradient_checkpointing=on, logprob_chunk_tokens=16,
                                lr_schedule="linear", warmup_steps=2, total_steps=4)
        core = LearnerCore(toy_world.policy, settings)
        assert core.learning_rate() == pytest.approx(0.005)  # warmup: the first step at half the rate
        calls = []
        core.engine.module.model.layers[0].register_forward_pre_hook(lambda *_: calls.append(1))  # a recompute stops early: no post-hook
        results[on] = ppo_step(core, ids, attn, resp)
        layer_calls[on] = len(calls)
        assert core.learning_rate() == pytest.approx(0.01)  # the schedule advanced with the optimizer step
    # π_prox and the training forward (the reference is a model of its own); with checkpointing the backward pass
    # runs the layer once more
    assert layer_calls == {False: 2, True: 3}
    assert results[False][1] > 0
    assert results[True][0] == pytest.approx(results[False][0], rel=1e-6)
    assert results[True][1] == pytest.approx(results[False][1], rel=1e-5)


def test_lora_exports_merged_weights_under_base_names(process_group, toy_world):
    settings = CoreSettings(zero_stage=2, learning_rate=0.05, lora_rank=4, lora_alpha=8.0, reference="adapter")
    core = LearnerCore(toy_world.policy, settings)
    from transformers import AutoModelForCausalLM
    base = AutoModelForCausalLM.from_pretrained(toy_world.policy, dtype=torch.float32)
    base_names = [n for n, _ in base.named_parameters()]
    assert [n for n, _, _ in core.layout()] == base_names  # the engines' names, in the same order
    ids, attn, resp = batch(256)
    trainable = sum(p.numel() for p in core.engine.module.parameters() if p.requires_grad)
    assert 0 < trainable < sum(p.numel() for p in base.parameters()) / 5
    before = {n: t.clone() for b in core.full_buckets(1 << 20) for n, t in b}
    for _ in range(2):  # the first step moves B away from 0; the merged weights differ from the base from then on
        ppo_step(core, ids, attn, resp)
    after = {n: t.clone() for b in core.full_buckets(1 << 20) for n, t in b}
    peft_model = core.engine.module
    expected = {}
    for name, module in peft_model.named_modules():
        if hasattr(module, "get_delta_weight"):
            w = module.get_base_layer().weight
            expected[name.removeprefix("base_model.model.") + ".weight"] = w + module.get_delta_weight("default")
    assert expected, "no LoRA layer"
    for name, want in expected.items():
        torch.testing.assert_close(after[name], want.detach(), rtol=1e-5, atol=1e-6)
        assert torch.equal(before[name], dict(base.named_parameters())[name].detach())
    assert any(not torch.equal(after[n], before[n]) for n in expected)
    # the reference is the policy with its adapters off: the initial model
    with torch.no_grad():
        ref = core.logprobs(ids, attn, reference=True)
        plain = chunked_logprobs(base, ids, attn, chunk_tokens=0)
    torch.testing.assert_close(ref, plain, rtol=1e-5, atol=1e-5)


def test_learning_rate_schedules():
    assert [lr_factor(s, "constant", 2, 10) for s in range(4)] == [0.5, 1.0, 1.0, 1.0]
    linear = [lr_factor(s, "linear", 0, 4) for s in range(5)]
    assert linear == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])
    cosine = [lr_factor(s, "cosine", 1, 5, min_ratio=0.1) for s in range(6)]
    assert cosine[0] == 1.0 and cosine[1] == pytest.approx(1.0) and cosine[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(cosine[1:], cosine[2:]))
    with pytest.raises(ValueError, match="unknown learning-rate schedule"):
        lr_factor(3, "step", 0, 5)


def test_token_and_sequence_aggregation_weights():
    """The token-level weights make the per-sample token means a mean over every token of the batch."""
    lengths = [2, 6]
    per_token = [torch.tensor([1.0, 1.0]), torch.tensor([4.0] * 6)]
    token_means = torch.stack([t.mean() for t in per_token])
    weights = torch.tensor([n * len(lengths) / sum(lengths) for n in lengths])
    assert float((token_means * weights).mean()) == pytest.approx(float(torch.cat(per_token).mean()))
    assert algorithms.token_mean(torch.ones(2, 3), torch.tensor([[1.0, 1, 0], [1, 0, 0]])).tolist() == [1.0, 1.0]


def test_gpu_learner_check_runs_without_ray_or_vllm(tmp_path):
    """jobs/gpu_learner_check.py on a tiny random model: ZeRO-2, ZeRO-3 built under zero.Init with checkpointing and
    chunked log-probs, and LoRA each train and report figures, in child processes that never import Ray or vLLM."""
    import json
    import subprocess
    import sys
    out = tmp_path / "check.jsonl"
    proc = subprocess.run([sys.executable, "jobs/gpu_learner_check.py", "--model", "tiny", "--variants",
                           "zero2,zero3_ckpt_chunked,lora", "--rows", "2", "--prompt-tokens", "8",
                           "--response-tokens", "8", "--chunk-tokens", "8", "--steps", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["variant"] for r in rows] == ["zero2", "zero3_ckpt_chunked", "lora"]
    for r in rows:
        assert r["step_s"] > 0 and 0 < r["mfu"] and r["step_rss_peak_gb"] > 0 and r["loss"] == r["loss"]
        assert r["modules_loaded"] == []  # neither Ray nor vLLM was imported
