"""A reward model trained on AI labels (canonical RLAIF): a sequence-classification head (one logit) on a
Hugging Face model, trained by its own actor on the judge's soft pairwise preferences, refreshed on fresh
on-policy labels while the run goes on, and read by RewardScorer.

Loss per judged pair (i, j) with soft label p = P(i ≻ j) and d = r(i) − r(j):
    margin_scale = 0:  −p log σ(d) − (1 − p) log σ(−d)                (cross-entropy on the soft label)
    margin_scale > 0:  −log σ(d_w − m),  m = margin_scale · |2p − 1|  (Bradley–Terry with the preference
                       strength as a margin; w is the judged winner; the self_reference margin)
Text is tokenized with the reward model's own tokenizer, so it need not share the policy's.
"""
from __future__ import annotations

import random
import time
from collections import deque

import numpy as np
import pyarrow as pa
import ray
import torch
import torch.nn.functional as F

from rlaif_ray import algorithms
from rlaif_ray.config import RunConfig
from rlaif_ray.console import stage_output_to_run_folder
from rlaif_ray.data.transport import use_arrow_ipc


def load_reward_model(path: str):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = tok.pad_token_id  # the head reads the last non-pad token
    return model, tok


def score_texts(model, tok, prompts: list[str], responses: list[str], batch: int = 64) -> torch.Tensor:
    """One scalar per (prompt, response), right-padded batches."""
    out = []
    for k in range(0, len(prompts), batch):
        texts = [p + r for p, r in zip(prompts[k:k + batch], responses[k:k + batch])]
        enc = tok(texts, return_tensors="pt", padding=True)
        out.append(model(**enc).logits[:, 0])
    return torch.cat(out) if out else torch.zeros(0)


def pair_loss(d: torch.Tensor, p: torch.Tensor, margin_scale: float) -> torch.Tensor:
    if margin_scale <= 0:
        return -(p * F.logsigmoid(d) + (1 - p) * F.logsigmoid(-d))
    sign = torch.where(p >= 0.5, 1.0, -1.0)
    return -F.logsigmoid(sign * d - margin_scale * (2 * p - 1).abs())


def labelled_pairs(table: pa.Table) -> list[tuple[str, str, str, float]]:
    """(prompt, response_i, response_j, P(i ≻ j)) for every judged pair in a labels table, each pair once."""
    ids = table.column("sample_id").to_pylist()
    valid = table.column("label_valid").to_pylist()
    pairs = algorithms.preference_pairs(ids, table.column("pair_partner_ids").to_pylist(),
                                        table.column("pair_win_probs").to_pylist(),
                                        {i for i, v in enumerate(valid) if v})
    prompts, responses = table.column("prompt").to_pylist(), table.column("response").to_pylist()
    return [(prompts[i], responses[i], responses[j], p) for i, j, p in pairs]


@ray.remote
class RewardModelTrainer:
    """Keeps the latest `reward.buffer_batches` labelled batches and fits the reward model on them."""

    def __init__(self, model_path: str, cfg: dict):
        use_arrow_ipc()  # tables in and out as one IPC buffer each (rlaif_ray.data.transport)
        self.cfg = RunConfig.model_validate(cfg)
        stage_output_to_run_folder(self.cfg, "reward-model-trainer")  # output.console=quiet: logs to run_dir/logs
        torch.manual_seed(self.cfg.loop.seed)
        self.rng = random.Random(self.cfg.loop.seed)
        self.model, self.tok = load_reward_model(model_path)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=self.cfg.reward.learning_rate)
        self.buffer: deque = deque(maxlen=self.cfg.reward.buffer_batches)
        self.fits = 0

    def add(self, labels: pa.Table, save_path: str | None = None) -> int:
        """Buffer a labelled batch's pairs for the next refit; `save_path`: also keep the batch as Parquet (labels
        made beside the loop, `reward.label_share` < 1, reach the run's label dataset this way)."""
        if save_path:
            from rlaif_ray.data.transport import write_parquet
            write_parquet(labels, save_path)
        self.buffer.append(labelled_pairs(labels))
        return sum(len(b) for b in self.buffer)

    def fit(self, steps: int | None = None) -> dict:
        """`steps` minibatch updates on the buffered pairs; returns loss and the agreement with the judge."""
        rcfg = self.cfg.reward
        pairs = [p for batch in self.buffer for p in batch]
        if not pairs:
            return {"rm_pairs": 0}
        t0 = time.perf_counter()
        self.model.train()
        losses = []
        for _ in range(steps if steps is not None else rcfg.train_steps):
            mb = self.rng.sample(pairs, min(rcfg.batch_pairs, len(pairs)))
            prompts = [x[0] for x in mb]
            r = score_texts(self.model, self.tok, prompts + prompts, [x[1] for x in mb] + [x[2] for x in mb])
            d = r[:len(mb)] - r[len(mb):]
            loss = pair_loss(d, torch.tensor([x[3] for x in mb]), rcfg.margin_scale).mean()
            self.opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.opt.step()
            losses.append(loss.item())
        self.fits += 1
        self.model.eval()
        with torch.no_grad():
            decided = [x for x in pairs if abs(x[3] - 0.5) > 1e-6]
            prompts = [x[0] for x in decided]
            r = score_texts(self.model, self.tok, prompts + prompts, [x[1] for x in decided] + [x[2] for x in decided])
            d = (r[:len(decided)] - r[len(decided):]).numpy()
        agree = float(np.mean([(di > 0) == (x[3] > 0.5) for di, x in zip(d, decided)])) if decided else float("nan")
        return {"rm_pairs": len(pairs), "rm_loss": float(np.mean(losses)), "rm_judge_agreement": agree,
                "rm_fit_seconds": time.perf_counter() - t0, "rm_fits": self.fits}

    def state_dict(self) -> dict:
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def save_state(self, path: str) -> str:
        """Everything a resumed run needs to continue the same fits: weights, optimizer, RNG, buffer."""
        torch.save({"model": self.model.state_dict(), "opt": self.opt.state_dict(), "rng": self.rng.getstate(),
                    "buffer": list(self.buffer), "fits": self.fits}, path)
        return path

    def load_state(self, path: str) -> int:
        state = torch.load(path, weights_only=False)
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["opt"])
        self.rng.setstate(state["rng"])
        self.buffer.clear()
        self.buffer.extend(state["buffer"])
        self.fits = state["fits"]
        return self.fits

    def save(self, path: str) -> str:
        self.model.save_pretrained(path, safe_serialization=True)
        self.tok.save_pretrained(path)
        return path
