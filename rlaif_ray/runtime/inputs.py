"""What a run reads before any actor starts, checked on the driver: model paths, the judge's labels or
endpoint, the prompt file and prompt lengths. Bad input stops here with an error naming the file, row or key.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rlaif_ray.config import ConfigError, RunConfig
from rlaif_ray.data.chat import ChatTemplateError, prompt_length, resolve_template
from rlaif_ray.data.checkers import BUILT_IN, CheckerError, make_checker
from rlaif_ray.data.preferences import PreferenceKeys, read_preference_file
from rlaif_ray.data.prompts import PromptKeys, read_prompt_file
from rlaif_ray.judge.remote import OpenAIJudge, RemoteJudgeError
from rlaif_ray.judge.reply import JudgeLabelError, concrete_labels, label_token_ids
from rlaif_ray.runtime.trackers import check_trackers
from rlaif_ray.stages.reward_functions import make_components


@dataclass
class Resolved:
    """Inputs checked before any actor starts."""
    policy: str
    critic: str
    prompts_path: str
    prompts: object  # pa.Table
    reward_model: str | None = None  # backbone of reward.kind=reward_model
    prompts_left_out: int = 0        # longer than the context allows (data.long_prompts=skip)
    preferences: object = None       # pa.Table of preferences.path (rlaif_ray.data.preferences), if any
    preference_stats: dict | None = None  # its pairs per source and rows left out
    eval_prompts: object = None      # pa.Table of data.eval_prompts (None: evaluate on `prompts`)


def check_model_path(path: str, key: str) -> None:
    """A local folder must exist and hold a config.json; `org/name` is taken as a hub id."""
    local = Path(path).expanduser()
    is_hub_id = not local.exists() and not path.startswith((".", "~", "/")) and path.count("/") <= 1
    if is_hub_id:
        return
    if not local.is_dir():
        raise ConfigError(f"{key}: model path does not exist: {path}")
    if not (local / "config.json").is_file():
        raise ConfigError(f"{key}: {path} holds no config.json (not a Hugging Face model folder)")


def check_judge(cfg: RunConfig, critic: str) -> None:
    """The judge can give the labels the config asks for: one token per label (local), a reachable endpoint
    that answers a log-prob request (remote). Checked on the driver, before any actor starts. `auto` labels are
    made concrete in `cfg.critic` here, for the judge's tokenizer, so every actor and the report see the same."""
    if cfg.critic.remote.base_url:
        cfg.critic = concrete_labels(cfg.critic)
        try:
            with OpenAIJudge(cfg.critic.remote) as judge:
                judge.check()
        except RemoteJudgeError as err:
            raise ConfigError(f"critic.remote: {err}") from None
        return
    if cfg.learner.algorithm == "sft":
        cfg.critic = concrete_labels(cfg.critic)
        return
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(critic)
    try:
        resolve_template(cfg.critic.chat_template, tok, "critic.chat_template")
    except ChatTemplateError as err:
        raise ConfigError(str(err)) from None
    cfg.critic = concrete_labels(cfg.critic, tok)
    labels = cfg.critic.direct_labels if cfg.critic.method == "direct" else cfg.critic.pairwise_labels
    try:
        label_token_ids(tok, labels, critic)
    except JudgeLabelError as err:
        raise ConfigError(str(err)) from None


def check_user_code(cfg: RunConfig) -> None:
    """The user's checker and reward functions import and are callable here, before any actor; a path spec becomes
    absolute (actors run in other folders), and the files they live in are listed for the actors
    (`cfg.ray.py_modules`, shipped by `start_ray`)."""
    from rlaif_ray.user_code import UserCodeError, absolute_spec, files_to_ship
    try:
        if cfg.data.checker not in BUILT_IN:
            cfg.data.checker = absolute_spec(cfg.data.checker)
        make_checker(cfg.data.checker)
        functions = [entry for entry in cfg.reward.functions if entry.function]
        for entry in functions:
            entry.function = absolute_spec(entry.function)
        make_components([entry.model_dump() for entry in cfg.reward.functions])  # errors name reward.functions[i]
        specs = [entry.function for entry in functions] + ([cfg.data.checker] if cfg.data.checker not in BUILT_IN else [])
        cfg.ray.py_modules = sorted(set(cfg.ray.py_modules) | set(files_to_ship(specs)))
    except (CheckerError, UserCodeError) as err:
        raise ConfigError(str(err)) from None


def resolve_inputs(cfg: RunConfig) -> Resolved:
    """Build/reuse a built-in world (`toy`, `smol`) where the config names one, then check model paths, the judge
    and the prompt file."""
    policy, critic, prompts_path = built_in_worlds(cfg)
    check_model_path(policy, "model.policy")
    if not cfg.critic.remote.base_url:  # a remote judge needs no local critic model
        check_model_path(critic, "model.critic")
    if cfg.judge_in_loop():  # reward.label_share=0: no judge is asked anything
        check_judge(cfg, critic)
    check_user_code(cfg)
    check_trackers(cfg)
    prompts, left_out = _fit_prompts_to_context(cfg, policy, prompts_path, _read_prompts(cfg, prompts_path))
    if cfg.data.prompts_per_step > prompts.num_rows:
        raise ConfigError(f"data.prompts_per_step={cfg.data.prompts_per_step} is more than the "
                          f"{prompts.num_rows} prompts in {prompts_path}")
    if cfg.reward.kind == "checker":
        _check_references(prompts, prompts_path)
    eval_prompts = None
    eval_path = eval_prompts_path(cfg)
    if eval_path is not None:
        eval_prompts, _ = _fit_prompts_to_context(cfg, policy, eval_path, _read_prompts(cfg, eval_path))
        print(f"[rlaif] evaluating before and after on {eval_prompts.num_rows} prompts of {eval_path} "
              f"(data.eval_prompts), not on the training prompts", flush=True)
    local = lambda p: str(Path(p).expanduser().resolve()) if Path(p).expanduser().exists() else p  # noqa: E731
    reward_model = None
    if cfg.reward.kind == "reward_model":
        reward_model = {"policy": policy, "critic": critic}.get(cfg.reward.model, cfg.reward.model)
        check_model_path(reward_model, "reward.model")
        reward_model = local(reward_model)
    preferences, preference_stats = read_preferences(cfg)
    return Resolved(local(policy), local(critic), prompts_path, prompts, reward_model, left_out, preferences,
                    preference_stats, eval_prompts)


def _check_references(prompts, path: str) -> None:
    """reward.kind=checker grades every sample against its prompt's reference: each prompt needs one."""
    refs = prompts.column("reference").to_pylist()
    missing = [i for i, r in enumerate(refs) if r is None]
    if missing:
        first = prompts.column("prompt_id")[missing[0]].as_py()
        raise ConfigError(f"{path}: prompt '{first}' has no reference (data.reference_key), which reward.kind=checker "
                          f"grades against; {len(missing)} of {len(refs)} prompts lack one")


def eval_prompts_path(cfg: RunConfig) -> str | None:
    """data.eval_prompts as a file path ("smol_held_out": the smol world's held-out sums)."""
    name = cfg.data.eval_prompts
    if name != "smol_held_out":
        return name
    if cfg.smol.held_out == 0:
        raise ConfigError("data.eval_prompts=smol_held_out needs smol.held_out > 0 (the number of sums kept out of "
                          "the RL prompts)")
    from rlaif_ray.worlds.smol import build_smol_world
    return build_smol_world(cfg.smol).held_out_prompts


def read_preferences(cfg: RunConfig):
    """preferences.path as a table, with what it holds said once (pairs per source, rows left out, unused fields)."""
    p = cfg.preferences
    if not p.path:
        return None, None
    keys = PreferenceKeys(prompt=p.prompt_key, messages=p.messages_key, id=p.id_key, chosen=p.chosen_key,
                          rejected=p.rejected_key, label=p.label_key, strength=p.strength_key, source=p.source_key,
                          split=p.split)
    table, stats = read_preference_file(p.path, keys)
    sources = ", ".join(f"{n} {name}" for name, n in sorted(stats["sources"].items()))
    print(f"[rlaif] {p.path}: {stats['pairs']} preference pairs ({sources})"
          + (f"; {stats['identical_left_out']} rows left out (chosen = rejected)" if stats["identical_left_out"] else "")
          + "".join(f"; field '{name}' ({n} rows) is not used" for name, n in sorted(stats["unused_fields"].items())),
          flush=True)
    return table, {"path": str(Path(p.path).expanduser().resolve()), **stats}


def read_graded(cfg: RunConfig):
    """preferences.path read as graded single answers ((prompt, response, grade) rows), with what it holds said
    once."""
    from rlaif_ray.data.graded import GradedKeys, read_graded_file
    p = cfg.preferences
    keys = GradedKeys(prompt=p.prompt_key, messages=p.messages_key, id=p.id_key, response=p.response_key,
                      grade=p.grade_key, split=p.split)
    rows, stats = read_graded_file(p.path, keys)
    print(f"[rlaif] {p.path}: {stats['answers']} graded answers (mean grade {stats['mean_grade']})"
          + "".join(f"; field '{name}' ({n} rows) is not used" for name, n in sorted(stats["unused_fields"].items())),
          flush=True)
    return rows, stats


def built_in_worlds(cfg: RunConfig) -> tuple[str, str, str]:
    """model.policy, model.critic and data.prompts, with the names of built-in worlds replaced by their paths."""
    names = (cfg.model.policy, cfg.model.critic, cfg.data.prompts)
    paths = list(names)
    if "toy" in names:
        from rlaif_ray.worlds.toy import build_toy_world
        toy = build_toy_world(cfg.toy, cfg.critic)
        paths = [{"toy": p}.get(n, q) for n, q, p in zip(names, paths, (toy.policy, toy.critic, toy.prompts))]
    if "smol" in names or cfg.model.critic == "smol_judge":
        from rlaif_ray.worlds.smol import build_smol_world
        smol = build_smol_world(cfg.smol)
        paths = [{"smol": p}.get(n, q) for n, q, p in zip(names, paths, (smol.model, smol.model, smol.prompts))]
    if cfg.model.critic == "smol_judge":  # built (about 17 min, once) only where a judge is asked anything
        from rlaif_ray.worlds.smol_judge import build_smol_judge
        paths[1] = build_smol_judge(cfg) if cfg.judge_in_loop() else smol.model
    return paths[0], paths[1], paths[2]


def _read_prompts(cfg: RunConfig, path: str):
    """The prompt table, with fields the loader did not use reported once (never dropped in silence)."""
    d = cfg.data
    keys = PromptKeys(prompt=d.prompt_key, messages=d.messages_key, id=d.id_key, reference=d.reference_key,
                      split=d.split)
    prompts, unused = read_prompt_file(path, keys)
    if unused:
        fields = ", ".join(f"'{name}' ({n} rows)" for name, n in sorted(unused.items()))
        print(f"[rlaif] {path}: field(s) {fields} are not used; the loader reads '{d.prompt_key}'/'{d.messages_key}', "
              f"'{d.id_key}' and '{d.reference_key}' (data.prompt_key, messages_key, id_key, reference_key; "
              "e.g. data.reference_key=answer)", flush=True)
    return prompts


def _fit_prompts_to_context(cfg: RunConfig, policy: str, path: str, prompts):
    """Prompts whose tokens leave no room for `rollout.max_new_tokens` in the rollout engine's context
    (`rollout.engine.max_model_len`, else `model.max_model_len`) would fail deep
    inside the engine: an error naming the prompt (data.long_prompts=error), or left out and counted (skip)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(policy)
    try:
        template = resolve_template(cfg.rollout.chat_template, tokenizer)
    except ChatTemplateError as err:
        raise ConfigError(str(err)) from None
    context = cfg.engine_for("rollout").max_model_len  # rollout.engine.max_model_len, else model.max_model_len
    limit = context - cfg.rollout.max_new_tokens
    lengths = [prompt_length(tokenizer, row, template) for row in prompts.select(["prompt", "messages"]).to_pylist()]
    too_long = [i for i, n in enumerate(lengths) if n > limit]
    if not too_long:
        return prompts, 0
    first = too_long[0]
    if cfg.data.long_prompts == "error":
        raise ConfigError(f"{path}: prompt '{prompts.column('prompt_id')[first].as_py()}' is {lengths[first]} tokens; "
                          f"with rollout.max_new_tokens={cfg.rollout.max_new_tokens} it may have at most {limit} "
                          f"(the rollout engine's max_model_len={context}); {len(too_long)} prompt(s) are too long "
                          "(data.long_prompts=skip leaves them out)")
    print(f"[rlaif] data.long_prompts=skip: {len(too_long)} of {prompts.num_rows} prompts in {path} are longer than "
          f"{limit} tokens and are left out", flush=True)
    keep = sorted(set(range(prompts.num_rows)) - set(too_long))
    return prompts.take(keep), len(too_long)
