"""LearnerRank: one DeepSpeed ZeRO rank per Ray actor (gloo on CPU, NCCL on GPU); the driver drives the N ranks
through `rlaif_ray.runtime.learner_group.LearnerGroup`. The model, its reference, log-probs, the optimizer step and
the weights out are a plain `rlaif_ray.learner_core.LearnerCore`; this actor turns Arrow batches into its tensors.

One `train_step` per batch; the rule is `learner.algorithm` (the math lives in `rlaif_ray.algorithms`):
- `ppo`: clipped surrogate on per-sample advantages (`learner.advantage`: group_mean, grpo, rloo,
  reinforce_pp), importance-corrected for samples an older policy version generated, KL penalty to the
  frozen initial policy; `ppo_epochs` updates per batch. Its log π (policy, before-update and reference) is
  taken at the rollout temperature and top-p, the distribution vLLM sampled from and returned log-probs of
  (`logprobs_mode=processed_logprobs`); `logprob_mismatch` reports how far the two are apart on the tokens the
  current version sampled. Every token's behaviour log-prob is that of the version that sampled it (a response
  continued under new weights mid-way carries two: `token_versions`); a sample is as stale as its oldest token.
- `dpo` / `ipo`: online preference optimisation on the judge's soft pairwise labels (OAIF), no reward.
- `sft`: supervised fine-tuning on demonstrations (the critic-as-teacher baseline); the learner
  tokenizes prompt and response text with the policy's own tokenizer (the prompt in the rollout's chat template)
  and appends EOS where the teacher stopped by itself (not to a demonstration cut off at the token limit).

Truncated samples (finish_reason "length") follow `rollout.truncated`: keep, mask (no gradient; in the PPO group
baseline still), or penalty (the reward `rollout.truncated_reward`).

Every rank reads the whole (zero-copy) table and trains on the prompt groups `g % world == rank`; each loss is
scaled so DeepSpeed's gradient averaging gives the mean over all training units (samples or pairs; with
`learner.loss_aggregation=token`, samples weighted by their response tokens: the mean over all tokens). Samples
more than `loop.max_staleness` versions older than the learner are dropped, invalid labels skipped; rank 0
returns the accounting of every sample id.
"""
from __future__ import annotations

import os
import socket
import time
from collections import defaultdict

import numpy as np
import pyarrow as pa
import ray
import torch

from rlaif_ray import algorithms
from rlaif_ray.config import RunConfig
from rlaif_ray.console import stage_output_to_run_folder
from rlaif_ray.data import schemas
from rlaif_ray.data.chat import engine_input, resolve_template, template_text
from rlaif_ray.data.checkers import make_checker
from rlaif_ray.data.examples import pick_examples
from rlaif_ray.data.transport import use_arrow_ipc
from rlaif_ray.judge.quality import label_quality
from rlaif_ray.learner_core import CoreSettings, LearnerCore, init_distributed
from rlaif_ray.weight_transfer import to_wire

STAT_KEYS = {
    "ppo": ("loss", "pg_loss", "kl", "clip_fraction", "is_weight_mean", "behav_log_ratio", "logprob_mismatch"),
    "dpo": ("loss", "kl", "pair_accuracy", "logratio_margin"),
    "ipo": ("loss", "kl", "pair_accuracy", "logratio_margin"),
    "sft": ("loss",),
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def pad_batch(prompts: list[list[int]], responses: list[list[int]], pad_id: int):
    """Right-padded prompt+response ids, attention mask, and the mask of response positions (shifted by one)."""
    seqs = [p + r for p, r in zip(prompts, responses)]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), width), dtype=torch.long)
    resp = torch.zeros((len(seqs), width - 1), dtype=torch.float32)
    for i, (p, s) in enumerate(zip(prompts, seqs)):
        ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
        attn[i, :len(s)] = 1
        resp[i, len(p) - 1:len(s) - 1] = 1.0
    return ids, attn, resp


def on_response(values: list[list[float]], resp: torch.Tensor, fill: float = float("nan")) -> torch.Tensor:
    """Per-token values of each row (the engine's log-probs, the token versions) placed on the response positions
    (`fill` elsewhere)."""
    out = torch.full(resp.shape, float(fill), dtype=torch.float32)
    for i, row in enumerate(values):
        pos = resp[i].nonzero().squeeze(-1)
        n = min(len(pos), len(row))
        out[i, pos[:n]] = torch.tensor(row[:n], dtype=torch.float32)
    return out


def token_versions(table: pa.Table) -> list[list[int]]:
    """The policy version that sampled each response token of every row: the rollouts' `token_versions`, or every
    token the row's `policy_version` where the row has none."""
    per_token = table.column("token_versions").to_pylist()
    started = table.column("policy_version").to_pylist()
    lengths = [len(t) for t in table.column("response_token_ids").to_pylist()]
    return [v if v is not None else [p] * n for v, p, n in zip(per_token, started, lengths)]


def demonstration_ids(tokenizer, prompts: list[str], responses: list[str], finish_reasons: list[str | None],
                      template: str | None = None):
    """Prompt and response token ids of SFT demonstrations in the policy's tokenizer. The prompt is rendered as the
    rollout renders it (`template`: the policy's chat template, one user turn; None: the plain text), so a chat
    policy learns the answer where its assistant turn begins. EOS ends a response only where the teacher stopped
    by itself (a demonstration cut off at the token limit must not teach stopping)."""
    rendered = [engine_input(tokenizer, {"prompt": t}, template) for t in prompts]
    prompt_ids = [r["prompt_token_ids"] if isinstance(r, dict) else tokenizer.encode(r) for r in rendered]
    response_ids = [tokenizer.encode(t, add_special_tokens=False) + [tokenizer.eos_token_id] * (f == "stop")
                    for t, f in zip(responses, finish_reasons)]
    return prompt_ids, response_ids


def core_settings(cfg: RunConfig) -> CoreSettings:
    """The learner section of a run config as the plain settings of a LearnerCore."""
    lcfg = cfg.learner
    return CoreSettings(
        zero_stage=lcfg.zero_stage, dtype=cfg.model.dtype, learning_rate=lcfg.learning_rate,
        weight_decay=lcfg.weight_decay, grad_clip=lcfg.grad_clip, lr_schedule=lcfg.lr_schedule,
        warmup_steps=lcfg.warmup_steps, min_lr_ratio=lcfg.min_lr_ratio,
        total_steps=cfg.loop.num_steps * (lcfg.ppo_epochs if lcfg.algorithm == "ppo" else 1),
        gradient_checkpointing=lcfg.gradient_checkpointing, logprob_chunk_tokens=lcfg.logprob_chunk_tokens,
        reference=lcfg.reference_placement(), reference_model=lcfg.reference_model, offload_optimizer=lcfg.offload_optimizer,
        offload_params=lcfg.offload_params, deepspeed=dict(lcfg.deepspeed), lora_rank=lcfg.lora.rank,
        lora_alpha=lcfg.lora.alpha, lora_dropout=lcfg.lora.dropout, lora_target_modules=lcfg.lora.target_modules,
        seed=cfg.loop.seed)


@ray.remote
class LearnerRank:
    def __init__(self, policy_path: str, cfg: dict, rank: int, world_size: int):
        use_arrow_ipc()  # tables in and out as one IPC buffer each (rlaif_ray.data.transport)
        self.cfg = RunConfig.model_validate(cfg)
        stage_output_to_run_folder(self.cfg, f"learner-{rank}")  # output.console=quiet: logs to run_dir/logs
        self.policy_path, self.rank, self.world_size = policy_path, rank, world_size
        self.checker = make_checker(self.cfg.data.checker)  # true accuracy in the step metrics
        self.version = 0
        self.sync_group = None  # rank 0: the collective weight-sync group it hosts (rlaif_ray.weight_transfer)
        self._probe: dict | None = None  # set during `gradient`: the step is measured, not applied

    def address(self) -> tuple[str, int]:
        return ray.util.get_node_ip_address(), _free_port()

    def setup(self, master_addr: str, master_port: int) -> int:
        from transformers import AutoTokenizer

        lcfg = self.cfg.learner
        backend = lcfg.backend if lcfg.backend != "auto" else ("nccl" if torch.cuda.is_available() else "gloo")
        init_distributed(backend, master_addr, master_port, self.rank, self.world_size)
        self.core = LearnerCore(self.policy_path, core_settings(self.cfg))
        self.device = self.core.device
        self.tokenizer = AutoTokenizer.from_pretrained(self.policy_path)
        self.template = resolve_template(self.cfg.rollout.chat_template, self.tokenizer)  # sft prompts, as rolled out
        config = self.core.engine.module.config
        self.pad_id = config.pad_token_id if config.pad_token_id is not None else 0
        return self.rank

    # ------------------------------------------------------------------ training
    def train_step(self, *tables: pa.Table) -> dict:
        """One update on the batch: the shards' tables, trained as one."""
        t0 = time.perf_counter()
        algo = self.cfg.learner.algorithm
        table = tables[0] if len(tables) == 1 else pa.concat_tables(tables)
        table = schemas.validate(table, "rollouts" if algo == "sft" else "rewards")
        ids = table.column("sample_id").to_pylist()
        versions = token_versions(table)
        # a sample is as stale as its oldest token: under rollout.in_flight_update=continue its later tokens may
        # come from newer weights than the ones its requests started under (policy_version)
        oldest = [min(v) if v else p for v, p in zip(versions, table.column("policy_version").to_pylist())]
        staleness = self.version - np.asarray(oldest, dtype=np.int64)
        outcome = {"trained": [], "stale": [], "skipped": []}
        if algo == "sft":  # demonstrations carry no label; their age does not matter
            trainable = list(range(len(ids)))
            rewards = [None] * len(ids)
        else:
            rewards = table.column("reward").to_pylist()
            valid = table.column("label_valid").to_pylist()
            reasons = table.column("skip_reason").to_pylist()
            trainable = []
            for i, sid in enumerate(ids):
                if staleness[i] > self.cfg.loop.max_staleness:
                    outcome["stale"].append(sid)
                elif not valid[i] or rewards[i] is None:
                    outcome["skipped"].append((sid, reasons[i] or "no_reward"))
                else:
                    trainable.append(i)
        truncated = {i for i, f in enumerate(table.column("finish_reason").to_pylist()) if f == "length"}
        if self.cfg.rollout.truncated == "penalty":  # a cut-off answer gets the set reward, whatever the judge said
            rewards = [self.cfg.rollout.truncated_reward if i in truncated and r is not None else r
                       for i, r in enumerate(rewards)]
        masked = {i for i in trainable if i in truncated} if self.cfg.rollout.truncated == "mask" else set()
        outcome["skipped"] += [(ids[i], "truncated") for i in sorted(masked)]
        in_baseline, trainable = trainable, [i for i in trainable if i not in masked]  # ppo: masked samples still
        group_of = table.column("prompt_id").to_pylist()                               # inform their group's mean
        signal_counts: dict[str, int] = {}
        groups = sorted({group_of[i] for i in in_baseline})
        my_groups = {g for k, g in enumerate(groups) if k % self.world_size == self.rank}

        if algo in ("dpo", "ipo"):
            pairs = algorithms.preference_pairs(ids, table.column("pair_partner_ids").to_pylist(),
                                                table.column("pair_win_probs").to_pylist(), set(trainable))
            in_pair = {i for i, j, _ in pairs} | {j for _, j, _ in pairs}
            for i in trainable:
                if i not in in_pair:
                    outcome["skipped"].append((ids[i], "no_trainable_pair"))
            trainable = sorted(in_pair)
            mine = [pair for pair in pairs if group_of[pair[0]] in my_groups]
            sums = self._update_preference(table, mine, total=len(pairs), total_rows=len(in_pair))
        else:
            mine = [i for i in trainable if group_of[i] in my_groups]
            if algo == "ppo":
                signal = self._signal(rewards, group_of, in_baseline, signal_counts)
                if signal:
                    adv = algorithms.advantages([rewards[i] for i in in_baseline],
                                                [group_of[i] for i in in_baseline], self.cfg.learner.advantage)
                    sums = self._update_ppo(table, mine, dict(zip(in_baseline, adv)), total=len(trainable),
                                            weight_of=self._sample_weights(table, trainable), versions=versions)
                else:  # every group's rewards are equal: nothing to learn, and the KL term alone would move the
                    # policy; every rank decides this from the same table, so all of them skip the step (the
                    # samples count as trained: the learner took them, and the step is counted as one without signal)
                    sums = {**dict.fromkeys(STAT_KEYS["ppo"], 0.0), "logprob_mismatch": None}
            else:
                sums = self._update_sft(table, mine, total=len(trainable),
                                        weight_of=self._sample_weights(table, trainable))
        outcome["trained"] = [ids[i] for i in trainable]
        stepped = signal_counts.get("optimizer_step", 1)
        grad_norm = self.core.grad_norm() if stepped and self._probe is None else None  # of this update, before clipping
        learning_rate = self.core.learning_rate()  # the rate the next step will use
        self.version += 1
        if self.cfg.learner.colocate and self.device.type == "cuda":  # the engine on this GPU wakes up next
            torch.cuda.empty_cache()
        if self.rank != 0:
            return {}
        fresh = staleness[trainable] if trainable else np.zeros(0)
        trained_versions = [versions[i] for i in trainable]
        token_ages = np.asarray([self.version - 1 - v for row in trained_versions for v in row], dtype=np.int64)
        metrics = {
            "learner_version": self.version, "train_seconds": time.perf_counter() - t0, **sums,
            "learning_rate": learning_rate,
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "samples_in": len(ids), "trained": len(outcome["trained"]), "dropped_stale": len(outcome["stale"]),
            "skipped": len(outcome["skipped"]), "truncated": len(truncated),
            "staleness_mean": float(fresh.mean()) if len(fresh) else 0.0,
            "staleness_max": int(fresh.max()) if len(fresh) else 0, **signal_counts,
            # per token (the versions that sampled the trained tokens), and the samples whose tokens span versions
            "token_staleness_mean": float(token_ages.mean()) if len(token_ages) else 0.0,
            "continued_samples": sum(len(set(row)) > 1 for row in trained_versions),
        }
        if algo != "sft":
            trained_rewards = [rewards[i] for i in trainable]
            metrics["reward_mean"] = float(np.mean(trained_rewards)) if trainable else float("nan")
            metrics["reward_std"] = float(np.std(trained_rewards)) if trainable else float("nan")
        metrics.update(label_quality(table, self.checker, self.cfg.critic.score_points()))
        outcome_of = {sid: "dropped_stale" for sid in outcome["stale"]} | {sid: "skipped" for sid, _ in outcome["skipped"]}
        examples = pick_examples(table, rewards, self.checker, self.cfg.output.examples_per_step, outcome_of)
        return {"metrics": metrics, "outcome": outcome, "examples": examples}

    def gradient(self, *tables: pa.Table, micro_batch_tokens: int | None = None) -> dict:
        """What `train_step` on the batch would do, measured and not applied: the accumulated gradient (whole, flat,
        fp32; None where no step would be taken) and the step's metrics on rank 0, with the weights, the schedule and
        the policy version left as they were. `micro_batch_tokens` overrides `learner.micro_batch_tokens`. Every
        rank must call it (collective). What the micro-batch property test compares (tests/test_micro_batches.py)."""
        self._probe, version = {"budget": micro_batch_tokens, "gradient": None}, self.version
        try:
            result = self.train_step(*tables)
        finally:
            probe, self._probe, self.version = self._probe, None, version
        if self.rank != 0:
            return {}
        gradient = probe["gradient"]
        return {**result, "gradient": gradient.numpy() if gradient is not None else None}

    def _train_passes(self, n_local: int, passes: int, loss_of) -> None:
        """The accumulated step (LearnerCore.train_passes), or under `gradient` its measurement."""
        if self._probe is None:
            self.core.train_passes(n_local, passes, loss_of)
        else:
            self._probe["gradient"] = self.core.train_passes(n_local, passes, loss_of, apply=False)

    @staticmethod
    def _signal(rewards: list, group_of: list, trainable: list[int], counts: dict) -> bool:
        """Whether any prompt group's rewards differ; counts groups with and without signal, and the step."""
        groups = [group_of[i] for i in trainable]
        with_signal = algorithms.signal_groups([rewards[i] for i in trainable], groups)
        counts.update(signal_groups=len(with_signal), zero_signal_groups=len(set(groups)) - len(with_signal),
                      optimizer_step=int(bool(with_signal)))
        return bool(with_signal)

    def _token_ids(self, table: pa.Table, rows: list[int]) -> tuple[list[list[int]], list[list[int]]]:
        """Prompt and response token ids of `rows`. sft: the teacher's tokenizer may differ from the policy's, so
        its text is tokenized here with the policy's tokenizer, and the response ends in EOS."""
        take = pa.array(rows, pa.int64())
        if self.cfg.learner.algorithm == "sft":
            return demonstration_ids(self.tokenizer, *(table.column(c).take(take).to_pylist()
                                                       for c in ("prompt", "response", "finish_reason")),
                                     template=self.template)
        return (table.column("prompt_token_ids").take(take).to_pylist(),
                table.column("response_token_ids").take(take).to_pylist())

    def _tensors(self, table: pa.Table, rows: list[int]):
        """Padded ids, attention, response mask and the behaviour log-probs of `rows` (on the device)."""
        prompts, responses = self._token_ids(table, rows)
        ids, attn, resp = pad_batch(prompts, responses, self.pad_id)
        behav = None
        if self.cfg.learner.algorithm != "sft":  # demonstrations have no behaviour log-probs
            logprobs = table.column("response_logprobs").take(pa.array(rows, pa.int64())).to_pylist()
            behav = on_response(logprobs, resp).to(self.device)
        return ids.to(self.device), attn.to(self.device), resp.to(self.device), behav

    def _lengths(self, table: pa.Table, rows: list[int]) -> dict[int, int]:
        """Tokens of prompt + response per row (what one row costs in a forward pass)."""
        prompts, responses = self._token_ids(table, rows)
        return {r: len(p) + len(q) for r, p, q in zip(rows, prompts, responses)}

    def _plan(self, table: pa.Table, units: list[list[int]]) -> tuple[list[list[int]], int]:
        """This rank's micro-batches (`learner.micro_batch_tokens` padded tokens each, 0: one) and the number of
        backward passes every rank makes: the most any rank needs, so the gradient reductions stay matched."""
        budget = self.cfg.learner.micro_batch_tokens
        if self._probe is not None and self._probe["budget"] is not None:
            budget = self._probe["budget"]
        rows = [r for unit in units for r in unit]
        mbs = algorithms.micro_batches(units, self._lengths(table, rows) if budget and rows else {}, budget)
        if not budget:
            return mbs, 1
        count = torch.tensor([float(max(len(mbs), 1))], dtype=torch.float64)
        count = count.to(self.device) if self.device.type == "cuda" else count
        torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.MAX)
        return mbs, int(count.item())

    def _reduce(self, keys: tuple[str, ...], sums: dict, units: int) -> dict:
        """Mean of each statistic over all ranks' training units."""
        local = torch.tensor([sums.get(k, 0.0) for k in keys] + [float(units)], dtype=torch.float64)
        local = local.to(self.device) if self.device.type == "cuda" else local
        torch.distributed.all_reduce(local)
        local = local.cpu()
        n = max(local[-1].item(), 1.0)
        return {k: local[i].item() / n for i, k in enumerate(keys)}

    def _sample_weights(self, table: pa.Table, rows: list[int]) -> dict[int, float]:
        """Each trained sample's weight on its per-sample token-mean loss. `sequence`: 1 (every response counts the
        same); `token`: its response tokens × samples / all response tokens of the batch, so the batch loss is the
        mean over every trained token (a long response is not down-weighted per token)."""
        if self.cfg.learner.loss_aggregation == "sequence" or not rows:
            return dict.fromkeys(rows, 1.0)
        lengths = [max(len(r), 1) for r in self._token_ids(table, rows)[1]]
        scale = len(rows) / sum(lengths)
        return {r: n * scale for r, n in zip(rows, lengths)}

    def _update_ppo(self, table, rows: list[int], adv_of: dict, total: int, weight_of: dict[int, float],
                    versions: list[list[int]]) -> dict:
        """Each token's importance weight is π_prox / π_behav, π_behav the engine's log-prob of the token under the
        version that sampled it (`token_versions`: a response continued under new weights has two). On the tokens
        the current version sampled the two must be equal: their mean |difference| per token, averaged over the
        samples that have such tokens, is `logprob_mismatch` (the engine/learner numerics, not policy lag).
        `versions`: every row's token versions (`token_versions(table)`)."""
        lcfg = self.cfg.learner
        sampling = {"temperature": self.cfg.rollout.temperature, "top_p": self.cfg.rollout.top_p}
        scale = self.world_size / max(total, 1)
        mbs, passes = self._plan(table, [[r] for r in rows])
        prepared = []
        mismatch = {"sum": 0.0, "rows": 0.0}

        def count_mismatch(prox_logp, resp, behav, current) -> None:
            known = resp * torch.isfinite(behav) * current
            gap = algorithms.token_mean(torch.nan_to_num((prox_logp - behav).abs()), known)
            has_fresh = known.sum(-1) > 0
            mismatch["sum"] += float(gap[has_fresh].sum())
            mismatch["rows"] += float(has_fresh.sum())

        # one epoch: log π_prox is the policy before this update, which the loss pass computes anyway (dropout is
        # off): taken from it, detached, instead of a pass of its own (a fifth of the step's FLOPs)
        own_prox_pass = lcfg.ppo_epochs > 1
        for mb in mbs:
            ids, attn, resp, behav = self._tensors(table, mb)
            current = (on_response([versions[i] for i in mb], resp, fill=-1) == self.version).to(self.device)
            adv = torch.tensor([adv_of[i] for i in mb], dtype=torch.float32, device=self.device)
            weight = torch.tensor([weight_of[i] for i in mb], dtype=torch.float32, device=self.device)
            with torch.no_grad():
                prox_logp = self.core.logprobs(ids, attn, **sampling) if own_prox_pass else None
                ref_logp = self.core.logprobs(ids, attn, **sampling, reference=True) if lcfg.kl() > 0 else None
                prepared.append((ids, attn, resp, behav, adv, weight, ref_logp, prox_logp, current))
                if prox_logp is not None:
                    count_mismatch(prox_logp, resp, behav, current)
        sums: dict[str, float] = defaultdict(float)
        for epoch in range(lcfg.ppo_epochs):
            def loss_of(k: int) -> torch.Tensor:
                ids, attn, resp, behav, adv, weight, ref_logp, prox_logp, current = prepared[k]
                logp = self.core.logprobs(ids, attn, **sampling)
                if prox_logp is None:
                    prox_logp = logp.detach()
                    with torch.no_grad():
                        count_mismatch(prox_logp, resp, behav, current)
                per_sample, pg, kl, stats = self.core.ppo_loss(
                    logp, prox_logp, behav, resp, adv, ref_logp, lcfg.clip_eps,
                    lcfg.is_cap if lcfg.importance_correction else None, lcfg.kl())
                per_sample = per_sample * weight
                if epoch == 0:  # report the first epoch: the on-batch values before this update moved anything
                    n = len(adv)
                    for key, value in (("loss", per_sample.sum().item()), ("pg_loss", pg.sum().item()),
                                       ("kl", kl.sum().item()), *((s, v * n) for s, v in stats.items())):
                        sums[key] += value
                return per_sample.sum() * scale
            self._train_passes(len(prepared), passes, loss_of)
        sums.update(mismatch_sum=mismatch["sum"], fresh_rows=mismatch["rows"])
        out = self._reduce(STAT_KEYS["ppo"][:-1] + ("mismatch_sum", "fresh_rows"), sums, len(rows))
        fresh_rows, mismatch_sum = out.pop("fresh_rows"), out.pop("mismatch_sum")
        out["logprob_mismatch"] = mismatch_sum / fresh_rows if fresh_rows > 0 else None
        return out

    def _update_preference(self, table, pairs: list[tuple[int, int, float]], total: int, total_rows: int) -> dict:
        """`total` pairs and `total_rows` rows in them over all ranks: the preference loss is the mean over pairs,
        the KL penalty the mean over rows, both of the whole batch (DeepSpeed averages the ranks' gradients)."""
        lcfg = self.cfg.learner
        group_of = table.column("prompt_id").to_pylist()
        units: dict[str, set[int]] = defaultdict(set)  # a prompt group's pairs share rows: keep them together
        for i, j, _ in pairs:
            units[group_of[i]] |= {i, j}
        mbs, passes = self._plan(table, [sorted(u) for u in units.values()])
        sums: dict[str, float] = defaultdict(float)

        def loss_of(k: int) -> torch.Tensor:
            rows = mbs[k]
            index = {r: n for n, r in enumerate(rows)}
            mine = [(i, j, q) for i, j, q in pairs if i in index]
            ids, attn, resp, _ = self._tensors(table, rows)
            logp = self.core.logprobs(ids, attn)
            ref_logp = self.core.logprobs(ids, attn, reference=True)
            logratio = ((logp - ref_logp) * resp).sum(-1)
            a = torch.tensor([index[i] for i, _, _ in mine], device=self.device)
            b = torch.tensor([index[j] for _, j, _ in mine], device=self.device)
            p = torch.tensor([q for _, _, q in mine], dtype=torch.float32, device=self.device)
            per_pair = algorithms.preference_loss(logratio[a], logratio[b], p, lcfg.dpo_beta, lcfg.algorithm)
            kl = algorithms.kl_k3(logp, ref_logp, resp)
            with torch.no_grad():
                h = logratio[a] - logratio[b]
                decided = (p - 0.5).abs() > 1e-6
                sums["loss"] += per_pair.sum().item()
                sums["kl_rows"] += kl.sum().item()
                sums["agree"] += (((h > 0) == (p > 0.5)) & decided).float().sum().item()
                sums["decided"] += decided.float().sum().item()
                sums["logratio_margin"] += (h * torch.sign(p - 0.5)).sum().item()
            return (per_pair.sum() * (self.world_size / max(total, 1))
                    + lcfg.kl() * kl.sum() * (self.world_size / max(total_rows, 1)))

        self._train_passes(len(mbs), passes, loss_of)
        # _reduce divides by all ranks' pairs: kl comes out as the mean over all rows, accuracy over decided pairs
        sums["kl"] = sums["kl_rows"] * total / max(total_rows, 1)
        out = self._reduce(("loss", "kl", "logratio_margin", "agree", "decided"), sums, len(pairs))
        agree, decided = out.pop("agree"), out.pop("decided")
        return {**out, "pair_accuracy": agree / decided if decided > 0 else 0.0}

    def _update_sft(self, table, rows: list[int], total: int, weight_of: dict[int, float]) -> dict:
        mbs, passes = self._plan(table, [[r] for r in rows])
        sums = {"loss": 0.0}

        def loss_of(k: int) -> torch.Tensor:
            ids, attn, resp, _ = self._tensors(table, mbs[k])
            weight = torch.tensor([weight_of[i] for i in mbs[k]], dtype=torch.float32, device=self.device)
            nll = algorithms.sft_loss(self.core.logprobs(ids, attn), resp) * weight
            sums["loss"] += nll.sum().item()
            return nll.sum() * (self.world_size / max(total, 1))

        self._train_passes(len(mbs), passes, loss_of)
        return self._reduce(STAT_KEYS["sft"], sums, len(rows))

    def score(self, token_ids: list[list[int]]) -> list[list[float]]:
        """log π(x_t | x_<t) for t >= 1 of each sequence under the current weights (temperature 1); collective
        under ZeRO-3 (every rank must call it). The engines' `score` after a sync must give the same."""
        out = []
        with torch.no_grad():
            for ids in token_ids:
                x = torch.tensor([ids], dtype=torch.long, device=self.device)
                lp = self.core.logprobs(x, torch.ones_like(x))
                out.append(lp[0].float().cpu().tolist())
        return out

    # ------------------------------------------------------------------ weights out
    def _rank0_copy(self) -> list[tuple[str, torch.Tensor]] | None:
        """Rank 0: every full parameter on the CPU (views where they already are full CPU tensors, copies of the
        gathered ones under ZeRO-3); other ranks take part in the gathers and copy nothing (None)."""
        if self.rank != 0 and self.cfg.learner.zero_stage != 3:
            return None
        out = []
        for bucket in self.core.full_buckets(self.cfg.sync.bucket_bytes()):
            if self.rank == 0:
                out += [(n, t.detach().cpu().clone() if self.cfg.learner.zero_stage == 3 else t.detach().cpu())
                        for n, t in bucket]
        return out if self.rank == 0 else None

    def weights_digest(self) -> str:
        """A hash of this rank's full parameters (ranks must agree after every step); collective under ZeRO-3."""
        import hashlib
        h = hashlib.sha256()
        for bucket in self.core.full_buckets(self.cfg.sync.bucket_bytes()):
            for name, p in bucket:
                h.update(name.encode())
                h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()

    def weights_layout(self) -> list:
        """(name, full shape, dtype) per parameter: what a sync group's receivers expect (rlaif_ray.weight_transfer)."""
        return self.core.layout()

    def export_weights(self):
        """The object-store path. Rank 0: (one numpy array per parameter, names) and a receipt, as two objects;
        other ranks: None and a receipt (under ZeRO-3 they take part in the bucket gathers, copying nothing).
        The arrays are views of the live fp32 parameters where ZeRO keeps them whole (no copy): Ray copies each
        once, straight into the store, while this actor runs nothing else. Weights travel in the training dtype:
        fp32 and fp16 as such, bf16 (which numpy lacks) as its bits in an int16 array (the engine views them back)."""
        params = self._rank0_copy()
        if self.rank != 0:
            return None, {"rank": self.rank}
        arrays = [to_wire(p) for _, p in params]
        return (arrays, [n for n, _ in params]), {"rank": 0}

    def broadcast_weights(self, spec: dict) -> dict:
        """The collective path: rank 0 sends the current weights over the sync group `spec` (joined first when
        it is a new generation), one bucket at a time; under ZeRO-3 every rank gathers each bucket with it. A
        failure (a receiver missing or too slow: the group's timeout) is returned, not raised, after the gathers
        are walked to the end, so the other ranks are never left waiting in a collective."""
        from rlaif_ray.weight_transfer import GroupSpec, open_group

        zero3 = self.cfg.learner.zero_stage == 3
        if self.rank != 0 and not zero3:
            return {"rank": self.rank, "ok": True}
        t0, error, sent = time.perf_counter(), None, 0
        if self.rank == 0 and self.sync_group is not None and \
                (self.sync_group.spec.host, self.sync_group.spec.port, self.sync_group.spec.generation) != \
                (spec["host"], spec["port"], spec["generation"]):
            self.sync_group.close()
            self.sync_group = None
        if self.rank == 0 and self.sync_group is None:
            try:
                self.sync_group = open_group(GroupSpec(**spec), 0)
            except Exception as err:
                error = f"sync group {spec['generation']} not formed: {type(err).__name__}: {str(err)[:300]}"
        t_joined = time.perf_counter()
        buckets = ([t for _, t in bucket] for bucket in self.core.full_buckets(spec["bucket_bytes"]))
        if self.rank == 0 and error is None:
            try:
                sent = self.sync_group.send(buckets, self.device)
            except Exception as err:
                error = f"weight broadcast failed: {type(err).__name__}: {str(err)[:300]}"
        for _ in buckets:  # the gathers not walked yet (rank 0 after a failure; other ranks under ZeRO-3: all)
            pass
        if error is not None and self.rank == 0 and self.sync_group is not None:
            self.sync_group.close()
            self.sync_group = None
        return {"rank": self.rank, "ok": error is None, "error": error, "bytes": sent,
                "join_seconds": t_joined - t0, "send_seconds": time.perf_counter() - t_joined}

    def save_state(self, folder: str) -> str | None:
        """Every rank: its DeepSpeed model + optimizer state into folder/deepspeed; rank 0 also the Hugging Face
        policy into folder/policy. Collective."""
        self.core.save_state(os.path.join(folder, "deepspeed"), {"policy_version": self.version})
        return self.save_checkpoint(os.path.join(folder, "policy"))

    def load_state(self, folder: str) -> int:
        """Model, optimizer and policy version from `save_state` (the frozen reference stays the initial policy)."""
        client = self.core.load_state(os.path.join(folder, "deepspeed"))
        self.version = int(client["policy_version"])
        return self.version

    def save_checkpoint(self, path: str) -> str | None:
        """Hugging Face format (model + tokenizer) written by rank 0. The tokenizer carries the chat template the
        policy was trained with (`rollout.chat_template`: its own, a file's, or none for plain prompts), so serving
        the checkpoint renders chats as the rollouts did. LoRA: the adapter in path/adapter, and the merged model
        unless `learner.lora.save_merged` is off. Collective under ZeRO-3."""
        lora = self.cfg.learner.lora
        params = self._rank0_copy() if lora.rank == 0 or lora.save_merged else None
        adapter = self.core.adapter_state() if lora.rank > 0 else None
        if self.rank != 0:
            return None
        from transformers import AutoTokenizer
        self.core.save_pretrained(path, params, adapter)
        tokenizer = AutoTokenizer.from_pretrained(self.policy_path)
        setting = self.cfg.rollout.chat_template
        if setting == "none":
            tokenizer.chat_template = None
        elif setting != "auto":
            tokenizer.chat_template = template_text(setting, "rollout.chat_template")
        tokenizer.save_pretrained(path)
        return path
