"""LearnerCore: the policy a learner rank trains, as a plain class (no Ray, no vLLM, not this project's config tree): the model under
DeepSpeed ZeRO, its reference, the log-probs and losses, the optimizer step with its learning-rate schedule, and the
full weights out (for the engines and for checkpoints). `rlaif_ray.stages.learner.LearnerRank` wraps one per Ray
actor; `jobs/gpu_learner_check.py` drives one on a GPU host that has only torch, transformers, peft and DeepSpeed.

Memory, from the model's size up:
- ZeRO-3 loads under `deepspeed.zero.Init` (transformers' DeepSpeed integration): no rank ever holds the full model.
- The reference (`reference`): `rank` a full frozen copy on each rank, `sharded` a ZeRO-3 inference engine (a 1/N
  share per rank), `cpu` the same with its parameters offloaded to host memory, `adapter` (LoRA) the policy itself
  with its adapters switched off (no second model), `none` not loaded (KL coefficient 0, no preference loss).
- Log-probs never hold the [B, T, V] fp32 logits: the decoder's last hidden states go through the output head
  `logprob_chunk_tokens` positions at a time, each chunk recomputed in the backward pass (`chunked_logprobs`).
- `gradient_checkpointing` recomputes each decoder layer's activations in the backward pass.
- bf16/fp16 training keeps fp32 master weights in DeepSpeed's optimizer; `offload_optimizer` / `offload_params`
  move optimizer state / parameters to host memory (ZeRO-Offload, DeepSpeed's CPU Adam); `deepspeed` is merged
  last into the DeepSpeed config (any key of it).
- LoRA (`lora_rank` > 0, peft): only the adapters train; the engines and checkpoints get merged weights under the
  base model's names (`export_items`), the adapter itself is saved beside them.
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch.utils.checkpoint import checkpoint

from rlaif_ray import algorithms
from rlaif_ray.weight_transfer import layout_of, plan_buckets

SCHEDULES = ("constant", "linear", "cosine")
# configs whose logits are not simply the output head of the last hidden state: the chunked path would differ
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


@dataclass
class CoreSettings:
    """What a LearnerCore needs (the learner section of the run config, resolved; see rlaif_ray.config)."""
    zero_stage: int = 2
    dtype: str = "float32"
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    total_steps: int = 1                 # optimizer steps the schedule spans
    gradient_checkpointing: bool = False
    logprob_chunk_tokens: int = 1024     # positions per output-head chunk (0: the plain [B, T, V] logits)
    reference: str = "rank"
    reference_model: str | None = None   # a Hugging Face folder or hub id; None: the model training starts from
    offload_optimizer: bool = False
    offload_params: bool = False
    deepspeed: dict = field(default_factory=dict)
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_target_modules: list[str] | str = "all-linear"
    seed: int = 0


def lr_factor(step: int, schedule: str, warmup: int, total: int, min_ratio: float = 0.0) -> float:
    """The learning rate of optimizer step `step` (0-based) as a fraction of the peak: linear warmup over `warmup`
    steps (the first step already moves: 1/warmup), then constant, linear or cosine decay to `min_ratio` at `total`."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    span = max(total - warmup, 1)
    progress = min(max(step - warmup, 0) / span, 1.0)
    if schedule == "linear":
        return min_ratio + (1 - min_ratio) * (1 - progress)
    if schedule == "cosine":
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    raise ValueError(f"unknown learning-rate schedule '{schedule}' (known: {', '.join(SCHEDULES)})")


def causal_lm(model):
    """The Hugging Face causal LM inside a DeepSpeed engine and/or a peft wrapper."""
    model = getattr(model, "module", model)  # DeepSpeedEngine
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _head_logprobs(head, hidden, targets, temperature: float, top_p: float) -> torch.Tensor:
    return algorithms.sampling_logprobs(head(hidden), targets, temperature, top_p)


def chunked_logprobs(model, input_ids: torch.Tensor, attn: torch.Tensor, temperature: float = 1.0,
                     top_p: float = 1.0, chunk_tokens: int = 1024) -> torch.Tensor:
    """log π(x_t | x_<t) for t >= 1, shape [B, T-1], at `temperature` and `top_p` (algorithms.sampling_logprobs).
    With `chunk_tokens` > 0 and more positions than that, the output head runs on `chunk_tokens` positions at a
    time, each chunk under activation checkpointing: the peak is one chunk's logits, not the batch's [B, T, V] fp32
    logits and their log-softmax (96k tokens × a 152k vocabulary ≈ 58 GB); the backward pass recomputes each
    chunk's head matmul. Equal to the plain path up to float summation order."""
    targets = input_ids[:, 1:]
    if chunk_tokens <= 0 or targets.numel() <= chunk_tokens:
        logits = model(input_ids=input_ids, attention_mask=attn, use_cache=False).logits[:, :-1]
        return algorithms.sampling_logprobs(logits, targets, temperature, top_p)
    lm = causal_lm(model)
    hidden = lm.get_decoder()(input_ids=input_ids, attention_mask=attn, use_cache=False).last_hidden_state[:, :-1]
    head = lm.get_output_embeddings()
    flat_h, flat_t = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    parts = []
    for s in range(0, flat_t.numel(), chunk_tokens):
        h, t = flat_h[s:s + chunk_tokens], flat_t[s:s + chunk_tokens]
        if torch.is_grad_enabled() and h.requires_grad:
            parts.append(checkpoint(_head_logprobs, head, h, t, temperature, top_p, use_reentrant=False))
        else:
            parts.append(_head_logprobs(head, h, t, temperature, top_p))
    return torch.cat(parts).reshape(targets.shape)


def init_distributed(backend: str, master_addr: str, master_port: int, rank: int, world_size: int) -> None:
    """DeepSpeed's process group for the learner ranks (gloo on CPU: DeepSpeed's CPU accelerator)."""
    os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK="0")
    if not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"
    import deepspeed
    deepspeed.init_distributed(dist_backend=backend, verbose=False)


class LearnerCore:
    """One rank's policy under DeepSpeed. `source`: a Hugging Face folder (or hub id), or a transformers config
    (random weights: checks and benchmarks). The process group must exist (`init_distributed`)."""

    def __init__(self, source, settings: CoreSettings, device: torch.device | None = None):
        import deepspeed
        from transformers import AutoModelForCausalLM, PretrainedConfig

        self.settings = s = settings
        self.device = device or (torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available()
                                 else torch.device("cpu"))
        self.dtype = getattr(torch, s.dtype)
        self.zero3 = s.zero_stage == 3
        self.ds_config = self._deepspeed_config()
        torch.manual_seed(s.seed)
        self._hf_ds = None
        if self.zero3:  # transformers loads (or builds) the model partitioned under deepspeed.zero.Init
            from transformers.integrations.deepspeed import HfDeepSpeedConfig
            self._hf_ds = HfDeepSpeedConfig(self.ds_config)

        def load(source=source):
            """Under ZeRO-3 (an HfDeepSpeedConfig alive) transformers builds the model inside zero.Init, partitioned on
            the GPU. Otherwise on a GPU it is built (random weights) or loaded straight onto it, never built on the
            CPU and copied over (49 s for 0.5B, 108 s for 3B on the H200, issue 26)."""
            from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
            on_device = self.device.type == "cuda" and not is_deepspeed_zero3_enabled()
            if isinstance(source, PretrainedConfig):  # random weights: the reference starts from the same ones
                torch.manual_seed(s.seed)
                with torch.device(self.device) if on_device else contextlib.nullcontext():
                    return AutoModelForCausalLM.from_config(source, dtype=self.dtype)
            placed = {"device_map": {"": self.device}} if on_device else {}
            return AutoModelForCausalLM.from_pretrained(source, dtype=self.dtype, **placed)

        model = load()
        model.config.use_cache = False
        # training mode (Hugging Face checkpoints layers only in it) without dropout: the learner's log-probs must be
        # the engines' (importance ratios, KL), as TRL's and OpenRLHF's RL trainers do
        model.train()
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        for key in ("attention_dropout", "hidden_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
            if isinstance(getattr(model.config, key, None), float):
                setattr(model.config, key, 0.0)
        if any(getattr(model.config, k, None) not in (None, 1, 1.0) for k in _LOGIT_TRANSFORMS):
            s.logprob_chunk_tokens = 0  # the logits are not head(hidden) alone: take the model's own forward
        if s.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if s.lora_rank > 0:
            from peft import LoraConfig, get_peft_model
            model = get_peft_model(model, LoraConfig(r=s.lora_rank, lora_alpha=s.lora_alpha,
                                                     lora_dropout=s.lora_dropout,
                                                     target_modules=s.lora_target_modules, task_type="CAUSAL_LM"))
        if not self.zero3:
            model = model.to(self.device)
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = None
        if not s.offload_optimizer:  # ZeRO-Offload builds DeepSpeed's CPU Adam from the config instead
            # fused: one kernel over all parameters, no per-step temporaries the size of the model (the foreach
            # AdamW's); on CPU too
            optimizer = torch.optim.AdamW(trainable, lr=s.learning_rate, weight_decay=s.weight_decay, fused=True)
        schedule = (lambda opt: torch.optim.lr_scheduler.LambdaLR(
            opt, lambda step: lr_factor(step, s.lr_schedule, s.warmup_steps, s.total_steps, s.min_lr_ratio)))
        self.engine, *_ = deepspeed.initialize(
            model=model, model_parameters=trainable, optimizer=optimizer, lr_scheduler=schedule,
            config=self.ds_config)
        self.ref = self._reference(load)

    # ------------------------------------------------------------------ set-up
    def _deepspeed_config(self) -> dict:
        s = self.settings
        zero: dict = {"stage": s.zero_stage}
        if s.offload_optimizer:
            zero["offload_optimizer"] = self._to_host()
        if s.offload_params:
            zero["offload_param"] = self._to_host()
        config = {
            "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
            "gradient_clipping": s.grad_clip, "zero_optimization": zero,
            "zero_allow_untested_optimizer": True, "steps_per_print": 10 ** 9,
            "bf16": {"enabled": s.dtype == "bfloat16"}, "fp16": {"enabled": s.dtype == "float16"},
        }
        if s.offload_optimizer:
            config["optimizer"] = {"type": "AdamW", "params": {"lr": s.learning_rate, "weight_decay": s.weight_decay}}
        return _merge(config, s.deepspeed)

    def _to_host(self) -> dict:
        """A ZeRO-Offload target: host memory (pinned where the device is a GPU)."""
        return {"device": "cpu", "pin_memory": self.device.type == "cuda"}

    def _reference(self, load: Callable):
        """The frozen policy the KL penalty and the preference losses compare with (see `reference`): the initial
        one, or `reference_model`."""
        import deepspeed
        where, other = self.settings.reference, self.settings.reference_model
        if where == "adapter" and other is not None:
            raise ValueError("learner.reference_model cannot be used with LoRA's reference (the policy without its "
                             "adapters is the model training started from)")
        if where in ("none", "adapter"):
            return None
        if other is not None:
            load = functools.partial(load, other)
        if where == "rank":
            if self.zero3:
                raise ValueError("learner.reference=rank under ZeRO-3 would build a partitioned copy; use sharded")
            return load().to(self.device).eval().requires_grad_(False)
        stage3 = {"stage": 3, **({"offload_param": self._to_host()} if where == "cpu" else {})}
        config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": stage3, "steps_per_print": 10 ** 9,
                  "bf16": self.ds_config["bf16"], "fp16": self.ds_config["fp16"]}
        from transformers.integrations.deepspeed import HfDeepSpeedConfig
        loading = HfDeepSpeedConfig(config)  # transformers loads under zero.Init while this object lives
        model = load().eval().requires_grad_(False)
        engine, *_ = deepspeed.initialize(model=model, config=config)
        del loading
        if self.zero3:  # the policy's own settings stay the ones transformers sees
            self._hf_ds = HfDeepSpeedConfig(self.ds_config)
        return engine

    # ------------------------------------------------------------------ log-probs and losses
    def logprobs(self, ids: torch.Tensor, attn: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0,
                 reference: bool = False) -> torch.Tensor:
        """log π (or log π_ref with `reference`: no gradient) of every next token, [B, T-1]."""
        chunk = self.settings.logprob_chunk_tokens
        if not reference:
            return chunked_logprobs(self.engine, ids, attn, temperature, top_p, chunk)
        with torch.no_grad():
            if self.settings.reference == "adapter":
                with self.engine.module.disable_adapter():
                    return chunked_logprobs(self.engine, ids, attn, temperature, top_p, chunk)
            if self.ref is None:
                raise RuntimeError("no reference model loaded (learner.reference=none)")
            return chunked_logprobs(self.ref, ids, attn, temperature, top_p, chunk)

    @staticmethod
    def ppo_loss(logp, prox_logp, behav, resp, adv, ref_logp, clip_eps: float, is_cap: float | None,
                 kl_coef: float):
        """Per-sample PPO objective (clipped surrogate + KL penalty, each a token mean) and its parts."""
        pg, stats = algorithms.ppo_loss(logp, prox_logp, behav, resp, adv, clip_eps, is_cap)
        kl = algorithms.kl_k3(logp, ref_logp, resp) if ref_logp is not None else torch.zeros_like(pg)
        return pg + kl_coef * kl, pg, kl, stats

    # ------------------------------------------------------------------ the step
    def train_passes(self, n_local: int, passes: int, loss_of: Callable[[int], torch.Tensor],
                     apply: bool = True) -> torch.Tensor | None:
        """`passes` backward passes accumulated into one optimizer step: micro-batch k < n_local contributes
        `loss_of(k)`; a rank with fewer micro-batches joins the remaining gradient reductions with `zero_loss`.
        `apply=False`: the accumulated gradient is returned instead (`full_gradient`, collective) and the weights
        stay as they are (`step_without_update`)."""
        for k in range(passes):
            self.engine.set_gradient_accumulation_boundary(k == passes - 1)
            self.engine.backward(loss_of(k) if k < n_local else self.zero_loss())
        if apply:
            self.engine.step()
            return None
        gradient = self.full_gradient()
        self.step_without_update()
        return gradient

    def zero_loss(self) -> torch.Tensor:
        """A loss of exactly 0 whose backward runs the graph of a real micro-batch (a forward of one short row).
        ZeRO-2/3 reduce each gradient as autograd makes it ready, into buckets laid out in that order, and every
        rank must lay them out alike: a rank that instead back-propagated Σ 0·p made them ready in parameter order,
        and the rank owning those parameters summed other parameters' gradients into them (issue 25)."""
        ids = torch.zeros((1, 2), dtype=torch.long, device=self.device)
        return self.logprobs(ids, torch.ones_like(ids)).sum() * 0.0

    def full_gradient(self) -> torch.Tensor:
        """The accumulated, rank-averaged gradient of every trainable parameter, whole and flat (fp32, CPU), on every
        rank, before clipping. Collective under ZeRO (each rank holds a share); call it before the step."""
        from deepspeed.utils import safe_get_full_grad
        params = [p for p in self.engine.module.parameters() if p.requires_grad]
        return torch.cat([safe_get_full_grad(p).detach().float().reshape(-1).cpu() for p in params])

    def step_without_update(self) -> None:
        """The optimizer step that closes an accumulation, at learning rate 0: the weights and the learning-rate
        schedule stay as they were (Adam's moments do take the gradient in)."""
        groups = self.engine.optimizer.param_groups
        rates = [g["lr"] for g in groups]
        schedule = self.engine.lr_scheduler
        state = schedule.state_dict() if schedule is not None else None
        for g in groups:
            g["lr"] = 0.0
        self.engine.step()
        for g, rate in zip(groups, rates):
            g["lr"] = rate
        if schedule is not None:
            schedule.load_state_dict(state)

    def learning_rate(self) -> float:
        """The rate the next optimizer step uses."""
        return float(self.engine.get_lr()[0])

    def grad_norm(self) -> float | None:
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else None

    # ------------------------------------------------------------------ weights out
    def export_items(self) -> list[tuple[str, list[torch.nn.Parameter], Callable]]:
        """(Hugging Face name, the parameters it is made of, how to make the full tensor from them) for every weight
        the engines load. Plain: one parameter each. LoRA: the base model's names; a wrapped layer's weight is
        W + scale · B·A (merged), the adapters themselves are not exported."""
        module = self.engine.module
        if self.settings.lora_rank <= 0:
            return [(n, [p], lambda ps: ps[0].data) for n, p in module.named_parameters()]
        from peft.tuners.lora import LoraLayer
        merged_of = {}  # id of a wrapped layer's base weight -> (its LoRA A, B, scale, transposed)
        for layer in module.modules():
            if isinstance(layer, LoraLayer):
                adapter = layer.active_adapters[0]
                merged_of[id(layer.get_base_layer().weight)] = (
                    layer.lora_A[adapter].weight, layer.lora_B[adapter].weight, layer.scaling[adapter],
                    getattr(layer, "fan_in_fan_out", False))
        items = []
        for name, p in module.named_parameters():
            if "lora_" in name:
                continue
            if id(p) not in merged_of:
                items.append((_base_name(name), [p], lambda ps: ps[0].data))
                continue
            a, b, scale, transpose = merged_of[id(p)]

            def merge(ps, scale=scale, transpose=transpose):
                w, a_, b_ = (t.data for t in ps)
                delta = (b_.float() @ a_.float()) * scale
                return (w.float() + (delta.T if transpose else delta)).to(w.dtype)
            items.append((_base_name(name), [p, a, b], merge))
        return items

    def layout(self) -> list[tuple[str, tuple, str]]:
        """(name, full shape, dtype) of every exported weight, in export order (rlaif_ray.weight_transfer)."""
        return layout_of([(name, parts[0]) for name, parts, _ in self.export_items()])

    def full_buckets(self, bucket_bytes: int):
        """The full exported weights, one bucket (weight_transfer.plan_buckets) at a time, as (name, tensor) lists
        valid until the next bucket is asked for. Under ZeRO-3 only that bucket's parameters are gathered, on
        every rank (collective: every rank must walk all buckets)."""
        items = self.export_items()
        for bucket in plan_buckets(layout_of([(name, parts[0]) for name, parts, _ in items]), bucket_bytes):
            chosen = [items[i] for i in bucket]
            if self.zero3:
                import deepspeed
                params = [p for _, parts, _ in chosen for p in parts]
                with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                    yield [(n, make(parts)) for n, parts, make in chosen]
            else:
                yield [(n, make(parts)) for n, parts, make in chosen]

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """The LoRA adapter's full tensors on the CPU, peft's names (gathered under ZeRO-3: collective)."""
        from peft import get_peft_model_state_dict
        module = self.engine.module
        gathered = contextlib.nullcontext()
        if self.zero3:
            import deepspeed
            lora = [p for n, p in module.named_parameters() if "lora_" in n]
            gathered = deepspeed.zero.GatheredParameters(lora, modifier_rank=None)
        with gathered:
            return {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(module).items()}

    def save_pretrained(self, path: str, params: list[tuple[str, torch.Tensor]] | None,
                        adapter: dict[str, torch.Tensor] | None = None) -> None:
        """Rank 0: the Hugging Face model (config + `params`, the full weights; None: the config alone) into `path`,
        and a LoRA `adapter` (peft format) into path/adapter."""
        lm = causal_lm(self.engine.module)
        if params is not None:
            lm.save_pretrained(path, state_dict=dict(params), safe_serialization=True)
        else:
            lm.config.save_pretrained(path)
        if adapter is not None:
            self.engine.module.save_pretrained(os.path.join(path, "adapter"), state_dict=adapter)

    def save_state(self, folder: str, client_state: dict) -> None:
        self.engine.save_checkpoint(folder, tag="state", client_state=client_state)

    def load_state(self, folder: str) -> dict:
        path, client = self.engine.load_checkpoint(folder, tag="state", load_optimizer_states=True,
                                                   load_lr_scheduler_states=True)
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed state in {folder}")
        return client


def _base_name(name: str) -> str:
    """A peft parameter name as the base model names it ("base_model.model.x.base_layer.weight" -> "x.weight")."""
    return name.removeprefix("base_model.model.").replace(".base_layer.", ".")


def _merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for k, v in override.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
