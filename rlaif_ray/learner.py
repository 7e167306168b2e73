"""The learner group: N Ray actors, one DeepSpeed ZeRO rank each (gloo on CPU, NCCL on GPU).

One update per batch of rewarded samples: REINFORCE with a per-prompt group baseline and a KL penalty to
the frozen reference policy (the weights at version 0), k3 estimator, token-mean per sequence:

    loss_i = -A_i · mean_t log π(y_t)  +  β · mean_t min(10, exp(r_t) − r_t − 1),   r_t = clamp(log π_ref(y_t) − log π(y_t), ±10)
    A_i    = R_i − mean_{j in group(i)} R_j

Every rank reads the whole (zero-copy) table and trains on the prompt groups `g % world == rank`; the loss
is scaled so DeepSpeed's gradient averaging gives the mean over all trainable samples. Samples more than
`loop.max_staleness` versions older than the learner are dropped, invalid labels skipped; rank 0 returns
the accounting of every sample id.
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

from rlaif_ray import schemas
from rlaif_ray.config import RunConfig
from rlaif_ray.feedback_metrics import label_quality


KL_LOG_RATIO_CLAMP = 10.0
KL_TOKEN_CLAMP = 10.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def sequence_logprobs(model, input_ids: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    """log π(x_t | x_<t) for t >= 1, shape [B, T-1]."""
    logits = model(input_ids=input_ids, attention_mask=attn).logits[:, :-1].float()
    return torch.log_softmax(logits, dim=-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)


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


@ray.remote
class LearnerRank:
    def __init__(self, policy_path: str, cfg: dict, rank: int, world_size: int):
        self.cfg = RunConfig.model_validate(cfg)
        self.policy_path, self.rank, self.world_size = policy_path, rank, world_size
        self.version = 0

    def address(self) -> tuple[str, int]:
        return ray.util.get_node_ip_address(), _free_port()

    def setup(self, master_addr: str, master_port: int) -> int:
        lcfg = self.cfg.learner
        gpu = torch.cuda.is_available()
        os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(self.rank),
                          WORLD_SIZE=str(self.world_size), LOCAL_RANK="0")
        if not gpu:
            os.environ["DS_ACCELERATOR"] = "cpu"
        import deepspeed
        from transformers import AutoModelForCausalLM

        backend = lcfg.backend if lcfg.backend != "auto" else ("nccl" if gpu else "gloo")
        deepspeed.init_distributed(dist_backend=backend, verbose=False)
        self.device = torch.device("cuda", 0) if gpu else torch.device("cpu")
        dtype = getattr(torch, self.cfg.model.dtype)
        model = AutoModelForCausalLM.from_pretrained(self.policy_path, dtype=dtype).to(self.device)
        self.ref = AutoModelForCausalLM.from_pretrained(self.policy_path, dtype=dtype).to(self.device).eval()
        self.ref.requires_grad_(False)
        self.pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
        ds_config = {
            "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
            "gradient_clipping": lcfg.grad_clip, "zero_optimization": {"stage": lcfg.zero_stage},
            "zero_allow_untested_optimizer": True, "steps_per_print": 10 ** 9,
            "bf16": {"enabled": self.cfg.model.dtype == "bfloat16"},
            "fp16": {"enabled": self.cfg.model.dtype == "float16"},
        }
        torch.manual_seed(self.cfg.loop.seed)
        optimizer = torch.optim.AdamW(model.parameters(), lr=lcfg.learning_rate, weight_decay=lcfg.weight_decay)
        self.engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
        return self.rank

    # ------------------------------------------------------------------ training
    def train_step(self, table: pa.Table) -> dict:
        t0 = time.perf_counter()
        table = schemas.validate(table, "rewards")
        lcfg, max_stale = self.cfg.learner, self.cfg.loop.max_staleness
        ids = table.column("sample_id").to_pylist()
        versions = np.asarray(table.column("policy_version").to_pylist())
        staleness = self.version - versions
        rewards = table.column("reward").to_pylist()
        valid = table.column("label_valid").to_pylist()
        reasons = table.column("skip_reason").to_pylist()
        outcome = {"trained": [], "stale": [], "skipped": []}
        trainable = []
        for i, sid in enumerate(ids):
            if staleness[i] > max_stale:
                outcome["stale"].append(sid)
            elif not valid[i] or rewards[i] is None:
                outcome["skipped"].append((sid, reasons[i] or "no_reward"))
            else:
                outcome["trained"].append(sid)
                trainable.append(i)
        # group baseline over the trainable samples of each prompt
        group_of = table.column("prompt_id").to_pylist()
        groups: dict[str, list[int]] = defaultdict(list)
        for i in trainable:
            groups[group_of[i]].append(i)
        advantage = {}
        for rows in groups.values():
            mean = float(np.mean([rewards[i] for i in rows]))
            for i in rows:
                advantage[i] = rewards[i] - mean
        mine = [i for g, key in enumerate(sorted(groups)) if g % self.world_size == self.rank for i in groups[key]]
        loss, sums = self._update(table, mine, advantage, total=len(trainable))
        self.version += 1
        metrics = {"learner_version": self.version, "train_seconds": time.perf_counter() - t0, **sums}
        if self.rank != 0:
            return {}
        fresh = staleness[trainable] if trainable else np.zeros(0)
        metrics.update(
            samples_in=len(ids), trained=len(outcome["trained"]), dropped_stale=len(outcome["stale"]),
            skipped=len(outcome["skipped"]),
            staleness_mean=float(fresh.mean()) if len(fresh) else 0.0,
            staleness_max=int(fresh.max()) if len(fresh) else 0,
            reward_mean=float(np.mean([rewards[i] for i in trainable])) if trainable else float("nan"),
            **label_quality(table),
        )
        return {"metrics": metrics, "outcome": outcome}

    def _update(self, table: pa.Table, rows: list[int], advantage: dict, total: int) -> tuple[float, dict]:
        model = self.engine.module
        if rows:
            prompts = table.column("prompt_token_ids").take(pa.array(rows)).to_pylist()
            responses = table.column("response_token_ids").take(pa.array(rows)).to_pylist()
            ids, attn, resp = pad_batch(prompts, responses, self.pad_id)
            ids, attn, resp = ids.to(self.device), attn.to(self.device), resp.to(self.device)
            adv = torch.tensor([advantage[i] for i in rows], dtype=torch.float32, device=self.device)
            logp = sequence_logprobs(self.engine, ids, attn)
            with torch.no_grad():
                ref_logp = sequence_logprobs(self.ref, ids, attn)
            n_tok = resp.sum(-1).clamp(min=1)
            # clamped: a token the (one version older) rollout policy sampled can be very unlikely under the
            # learner now, and an unclamped exp() turns one such token into a KL spike that wrecks the step
            log_ratio = (ref_logp - logp).clamp(-KL_LOG_RATIO_CLAMP, KL_LOG_RATIO_CLAMP)
            kl = ((torch.exp(log_ratio) - log_ratio - 1).clamp(max=KL_TOKEN_CLAMP) * resp).sum(-1) / n_tok
            pg = -adv * (logp * resp).sum(-1) / n_tok
            per_sample = pg + self.cfg.learner.kl_coef * kl
            loss = per_sample.sum() * (self.world_size / max(total, 1))
            local = torch.tensor([per_sample.sum().item(), kl.sum().item(), pg.sum().item(), float(len(rows))])
        else:  # still take part in the gradient all-reduce
            loss = sum((p * 0.0).sum() for p in model.parameters())
            local = torch.zeros(4)
        self.engine.backward(loss)
        self.engine.step()
        torch.distributed.all_reduce(local.to(self.device) if self.device.type == "cuda" else local)
        local = local.cpu()
        n = max(local[3].item(), 1.0)
        return loss.item(), {"loss": local[0].item() / n, "kl": local[1].item() / n, "pg_loss": local[2].item() / n}

    # ------------------------------------------------------------------ weights out
    def _full_params(self) -> list[tuple[str, torch.Tensor]]:
        """Full (gathered under ZeRO-3) parameters, CPU, in `named_parameters` order. Collective for ZeRO-3."""
        params = list(self.engine.module.named_parameters())
        if self.cfg.learner.zero_stage == 3:
            import deepspeed
            with deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=None):
                return [(n, p.detach().cpu().clone()) for n, p in params]
        return [(n, p.detach().cpu()) for n, p in params]

    def weights_digest(self) -> str:
        """A hash of this rank's full parameters (ranks must agree after every step); collective under ZeRO-3."""
        import hashlib
        h = hashlib.sha256()
        for name, p in self._full_params():
            h.update(name.encode())
            h.update(p.float().contiguous().numpy().tobytes())
        return h.hexdigest()

    def export_weights(self):
        """Rank 0: (flat numpy buffer, names, shapes), one object in the store; other ranks: None."""
        params = self._full_params()
        if self.rank != 0:
            return None
        flat = torch.cat([p.reshape(-1).float() if p.dtype != torch.float32 else p.reshape(-1) for _, p in params])
        return flat.numpy(), [n for n, _ in params], [tuple(p.shape) for _, p in params]

    def save_checkpoint(self, path: str) -> str | None:
        """Hugging Face format (model + tokenizer) written by rank 0."""
        params = self._full_params()
        if self.rank != 0:
            return None
        from transformers import AutoTokenizer
        model = self.engine.module
        model.save_pretrained(path, state_dict=dict(params), safe_serialization=True)
        AutoTokenizer.from_pretrained(self.policy_path).save_pretrained(path)
        return path


class LearnerGroup:
    """Driver-side handle on the N learner ranks, placed together (PACK) in one placement group."""

    def __init__(self, policy_path: str, cfg: RunConfig, placement_group):
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        lcfg = cfg.learner
        n = lcfg.num_learners
        self.ranks = [
            LearnerRank.options(
                num_cpus=lcfg.cpus_per_learner, num_gpus=lcfg.gpus_per_learner,
                scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group, placement_group_bundle_index=i),
                runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu"} if lcfg.gpus_per_learner == 0 else {}},
            ).remote(policy_path, cfg.model_dump(), i, n)
            for i in range(n)
        ]
        addr, port = ray.get(self.ranks[0].address.remote())
        ray.get([r.setup.remote(addr, port) for r in self.ranks])

    def train(self, rewards_ref) -> dict:
        results = ray.get([r.train_step.remote(rewards_ref) for r in self.ranks])
        return results[0]

    def export_weights(self):
        refs = [r.export_weights.remote() for r in self.ranks]
        ray.wait(refs, num_returns=len(refs), fetch_local=False)
        return refs[0]

    def save_checkpoint(self, path: str) -> str:
        return ray.get([r.save_checkpoint.remote(path) for r in self.ranks])[0]
