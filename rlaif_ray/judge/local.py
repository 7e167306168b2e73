"""The local judges: a vLLM engine (`critic.backend=vllm`) or a plain transformers model
(`critic.backend=transformers`) in the labeler's own process. The remote one is `rlaif_ray.judge.remote`.

Every judge answers the two questions every labeling method asks:
- `distribution(prompts, labels)`: the probabilities of the label strings as the next token (renormalised
  over the labels) and the mass they hold — the label is read from log-probs, never from free text when
  log-probs exist;
- `complete(prompts, max_tokens, stop)`: a greedy continuation (rationales, own answers, critiques).
Replies never raise for one bad prompt: they carry an `error` and the labeler counts it. With a chat template
(`critic.chat_template`) every prompt is one user turn and the label is the assistant's first token.
"""
from __future__ import annotations

import time

from rlaif_ray.config import RunConfig
from rlaif_ray.data.chat import resolve_template, user_turn_ids
from rlaif_ray.engine import make_llm
from rlaif_ray.judge.reply import JudgeReply, label_distribution, label_token_ids


class LocalJudge:
    """A vLLM engine in this process. Batch calls: latency per reply is the batch time shared out."""

    def __init__(self, model_path: str, cfg: RunConfig, seed: int):
        self.name = model_path
        self.llm = make_llm(model_path, cfg.engine_for("critic"), seed=seed)
        self.tokenizer = self.llm.get_tokenizer()
        self.template = resolve_template(cfg.critic.chat_template, self.tokenizer, "critic.chat_template")
        self.top_k = min(cfg.engine_for("critic").max_logprobs, len(self.tokenizer))
        self.max_prompt_len = cfg.engine_for("critic").max_model_len - 1
        self.label_ids: dict[tuple, list[int]] = {}  # per label set, on first use (only the method's labels
        self.calls = 0                                # need to be single tokens; the driver checked those)

    def _label_ids(self, labels) -> list[int]:
        if tuple(labels) not in self.label_ids:
            self.label_ids[tuple(labels)] = label_token_ids(self.tokenizer, labels, self.name)
        return self.label_ids[tuple(labels)]

    def _encode(self, prompts: list[str], room: int):
        """Token ids of each prompt, or an error reply when prompt + `room` new tokens do not fit."""
        out = []
        for text in prompts:
            ids = user_turn_ids(self.tokenizer, text, self.template)
            if len(ids) + room - 1 > self.max_prompt_len:
                out.append(JudgeReply(error=f"judge_prompt_too_long({len(ids)}>{self.max_prompt_len + 1 - room})"))
            else:
                out.append(ids)
        return out

    def _run(self, prompts: list[str], room: int, params):
        encoded = self._encode(prompts, room)
        todo = [(i, ids) for i, ids in enumerate(encoded) if not isinstance(ids, JudgeReply)]
        outs = []
        t0 = time.perf_counter()
        if todo:
            outs = self.llm.generate([{"prompt_token_ids": ids} for _, ids in todo], params, use_tqdm=False)
        share = (time.perf_counter() - t0) / max(len(todo), 1)
        self.calls += len(todo)
        return encoded, todo, outs, share

    def distribution(self, prompts: list[str], labels) -> list[JudgeReply]:
        from vllm import SamplingParams

        ids = self._label_ids(labels)
        encoded, todo, outs, share = self._run(prompts, 1, SamplingParams(max_tokens=1, temperature=0.0,
                                                                          logprobs=self.top_k))
        replies: list = list(encoded)
        for (i, _), out in zip(todo, outs):
            probs, mass = label_distribution(out.outputs[0].logprobs[0], ids)
            replies[i] = JudgeReply(probs=probs, mass=mass, text=out.outputs[0].text, latency_s=share,
                                    completion_tokens=1, prompt_tokens=len(out.prompt_token_ids))
        return replies

    def complete(self, prompts: list[str], max_tokens: int, stop: list[str]) -> list[JudgeReply]:
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, stop=stop or None)
        encoded, todo, outs, share = self._run(prompts, max_tokens, params)
        replies: list = list(encoded)
        for (i, _), out in zip(todo, outs):
            replies[i] = JudgeReply(text=out.outputs[0].text, latency_s=share, prompt_tokens=len(out.prompt_token_ids),
                                    completion_tokens=len(out.outputs[0].token_ids),
                                    finish_reason=out.outputs[0].finish_reason)
        return replies

    def usage(self) -> dict:
        return {"requests": self.calls}


class TransformersJudge(LocalJudge):
    """The judge as a plain transformers model in this process (`critic.backend=transformers`): reading a label
    is one prefill, with no KV cache to manage, so for small judges a padded batch forward beats an engine's
    per-request scheduling. Label probabilities come from the full softmax (not a top-k list)."""

    def __init__(self, model_path: str, cfg: RunConfig, seed: int):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.manual_seed(seed)
        self.name = model_path
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.template = resolve_template(cfg.critic.chat_template, self.tokenizer, "critic.chat_template")
        # the GPU Ray gave this actor (critic.gpus_per_worker > 0), else the CPU (issue 26: it never used the GPU)
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        self.model = AutoModelForCausalLM.from_pretrained(
            model_path, dtype=getattr(torch, cfg.engine_for("critic").dtype)).to(self.device).eval()
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.batch = cfg.critic.batch_size
        self.max_prompt_len = cfg.engine_for("critic").max_model_len - 1
        self.label_ids = {}
        self.calls = 0

    def _left_padded(self, rows: list[list[int]]):
        import torch
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for k, r in enumerate(rows):
            ids[k, width - len(r):], attn[k, width - len(r):] = torch.tensor(r), 1
        return ids.to(self.device), attn.to(self.device)

    def _batches(self, prompts: list[str], room: int):
        encoded = self._encode(prompts, room)
        todo = [(i, ids) for i, ids in enumerate(encoded) if not isinstance(ids, JudgeReply)]
        self.calls += len(todo)
        return encoded, [todo[k:k + self.batch] for k in range(0, len(todo), self.batch)]

    def distribution(self, prompts: list[str], labels) -> list[JudgeReply]:
        import torch
        label_ids = self._label_ids(labels)
        encoded, batches = self._batches(prompts, 1)
        replies: list = list(encoded)
        for chunk in batches:
            t0 = time.perf_counter()
            ids, attn = self._left_padded([row for _, row in chunk])
            with torch.no_grad():
                logits = self.model(input_ids=ids, attention_mask=attn,
                                    position_ids=(attn.cumsum(-1) - 1).clamp(min=0)).logits[:, -1].float()
            probs = torch.softmax(logits, -1).cpu()
            share = (time.perf_counter() - t0) / len(chunk)
            for (i, row), p in zip(chunk, probs):
                raw = [float(p[t]) for t in label_ids]
                mass = sum(raw)
                replies[i] = JudgeReply(probs=[x / mass for x in raw] if mass > 0 else raw, mass=mass,
                                        text=self.tokenizer.decode([int(p.argmax())]), latency_s=share,
                                        completion_tokens=1, prompt_tokens=len(row))
        return replies

    def complete(self, prompts: list[str], max_tokens: int, stop: list[str]) -> list[JudgeReply]:
        import torch
        encoded, batches = self._batches(prompts, max_tokens)
        replies: list = list(encoded)
        eos = self.tokenizer.eos_token_id
        for chunk in batches:
            t0 = time.perf_counter()
            ids, attn = self._left_padded([row for _, row in chunk])
            with torch.no_grad():
                out = self.model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=max_tokens,
                                          do_sample=False, pad_token_id=self.pad_id, eos_token_id=eos)
            share = (time.perf_counter() - t0) / len(chunk)
            for (i, row), seq in zip(chunk, out[:, ids.shape[1]:].cpu().tolist()):
                stopped = eos in seq
                seq = seq[:seq.index(eos)] if stopped else seq
                text = self.tokenizer.decode(seq, skip_special_tokens=True)
                cut = min([text.index(s) for s in stop or [] if s and s in text], default=len(text))
                replies[i] = JudgeReply(text=text[:cut], latency_s=share, prompt_tokens=len(row),
                                        completion_tokens=len(seq),
                                        finish_reason="stop" if stopped or cut < len(text) else "length")
        return replies
