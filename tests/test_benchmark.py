"""The benchmark's arithmetic on constructed metrics (the figures themselves come from jobs/benchmark.py)."""
import pytest

from rlaif_lab.benchmark import compare, format_table, run_figures


def rows(step_seconds, stages, n=6, staleness=0):
    return [{"step": i, "step_seconds": step_seconds, "samples_in": 32, "gen_tokens": 64, "sync_bytes": 2e6,
             "staleness_max": staleness, **{f"{k}_seconds": v for k, v in stages.items()}} for i in range(n)]


def test_ideal_overlap_and_achieved_fraction():
    stages = {"gen": 0.1, "label": 0.4, "reward": 0.0, "train": 0.2, "sync": 0.1}
    sync = run_figures(rows(0.8, stages), warmup=2)
    async_ = run_figures(rows(0.5, stages, staleness=1), warmup=2)
    assert sync["steps_measured"] == 4 and sync["samples_per_s"] == pytest.approx(32 / 0.8)
    assert sync["sync_gb_per_s"] == pytest.approx(2e6 / 0.1 / 1e9)
    cmp = compare(sync, async_)
    assert cmp["ideal_overlap_ratio"] == pytest.approx(0.8 / 0.4)   # sum of stages / slowest stage
    assert cmp["async_over_sync"] == pytest.approx(0.8 / 0.5)
    assert cmp["achieved_fraction_of_ideal"] == pytest.approx(1.6 / 2.0)
    assert cmp["bottleneck_stage"] == "label"
    assert async_["staleness_max_hist"] == {1: 4}
    assert "achieved fraction of ideal:    80%" in format_table(sync, async_, cmp)


def test_transport_from_a_constructed_timeline():
    from rlaif_lab.benchmark import transport_from_timeline, transport_share

    def ev(cat, tid, ts, dur):
        return {"cat": cat, "name": cat, "tid": tid, "ts": ts * 1e6, "dur": dur * 1e6, "ph": "X"}
    events = []
    for k in range(4):  # 4 steps, one generate (worker g) and one train_step on each of two ranks (r0, r1)
        t = 100.0 + k
        events += [ev("task::RolloutWorker.generate", "g", t, 0.30), ev("task:deserialize_arguments", "g", t, 0.01),
                   ev("task:execute", "g", t + 0.01, 0.28), ev("task:store_outputs", "g", t + 0.29, 0.01)]
        for r in ("r0", "r1"):
            events += [ev("task::LearnerRank.train_step", r, t + 0.4, 0.2), ev("task:deserialize_arguments", r, t + 0.4, 0.02),
                       ev("task:execute", r, t + 0.42, 0.18)]
    events.append(ev("task::Other.method", "o", 101.0, 0.5))                 # not a pipeline stage
    events.append(ev("task::RolloutWorker.generate", "g", 500.0, 0.3))       # outside the window
    t = transport_from_timeline(events, 99.0, 110.0)
    assert set(t) == {"gen", "train"} and t["gen"]["calls"] == 4 and t["train"]["calls"] == 8
    assert t["gen"]["deserialize_arguments_s_per_call"] == pytest.approx(0.01)
    assert t["gen"]["store_outputs_s_per_call"] == pytest.approx(0.01)
    assert t["train"]["execute_s_per_call"] == pytest.approx(0.18)
    # per step: gen moves 0.02 s, each of two ranks 0.02 s -> 0.06 s of a 1 s step
    assert transport_share(t, 1.0, {"train": 2}) == pytest.approx(0.06)


# ------------------------------------------------------------------ the peer comparison (jobs/peer_trl.py)
class FakeJudge:
    """A judge backend with a fixed answer per judge prompt (from its hash); records what it was asked. Prompts
    holding `low_mass` get label mass 0.01 (an unparsable reply)."""

    def __init__(self, low_mass: str = "??"):
        self.asked, self.low_mass = [], low_mass

    def distribution(self, prompts, labels):
        import zlib

        from rlaif_ray.judge.reply import JudgeReply
        self.asked.append(list(prompts))
        out = []
        for text in prompts:
            p = (zlib.crc32(text.encode()) % 1000) / 1000
            mass = 0.01 if self.low_mass in text else 0.9
            out.append(JudgeReply(probs=[p, 1 - p], mass=mass, text="1", prompt_tokens=len(text)))
        return out

    def usage(self):
        return {}


def peer_batch(step: int):
    """Two prompt groups (4 and 3 responses, identical ones and an unparsable one among them), rlaif_ray's ids."""
    import pyarrow as pa

    from rlaif_ray.data import schemas
    groups = [("add-2-3", "What is 2 + 3? Reply with the number only.", ["5", "2 + 3 = 5", "5", "6"]),
              ("add-4-4", "What is 4 + 4? Reply with the number only.", ["8", "??", "9"])]
    cols = {f.name: [] for f in schemas.ROLLOUT_SCHEMA}
    for pid, prompt, responses in groups:
        for k, response in enumerate(responses):
            for key, value in (("sample_id", schemas.sample_id(step, pid, k)), ("prompt_id", pid), ("group_index", k),
                               ("prompt", prompt), ("prompt_token_ids", [1, 2]), ("response", response),
                               ("response_token_ids", [3]), ("response_logprobs", [-1.0]), ("finish_reason", "stop"),
                               ("policy_version", 0), ("token_versions", None), ("reference", None)):
                cols[key].append(value)
    return pa.Table.from_pydict(cols, schema=schemas.ROLLOUT_SCHEMA)


@pytest.mark.parametrize("critic", [
    {},
    {"pairs": "random_k", "pairs_k": 1},
    {"pairs": "anchor", "principles": ["be exact", "be brief", "be kind"],
     "preamble": "Judge ({principle}).\n", "pairwise_ending": "\nWhich, 1 or 2?"},
])
def test_trl_reward_asks_the_labelers_judge_prompts_and_gives_its_rewards(critic):
    """The TRL reward function (rlaif_lab.peer.WinRateReward) sends the judge exactly the prompts CriticLabeler
    sends (same pairs, both orders, same principles, same order, same cache) and returns rlaif_ray's win-rate
    rewards, None where the labeler marks the sample invalid."""
    from types import SimpleNamespace

    from rlaif_ray.config import RunConfig
    from rlaif_ray.judge.cache import CachedJudge
    from rlaif_ray.judge.templates import JudgePrompts
    from rlaif_ray.stages.critic import CriticLabeler
    from rlaif_ray.stages.reward import rewards_from_labels
    from rlaif_lab.peer import WinRateReward

    cfg = RunConfig.model_validate({"critic": {"pairwise_labels": ["1", "2"], **critic}, "loop": {"seed": 3}})
    step, table = 5, peer_batch(5)
    labeler = object.__new__(CriticLabeler.__ray_actor_class__)  # the actor's own class, driven without Ray
    theirs = FakeJudge()
    labeler.cfg, labeler.ccfg, labeler.seed, labeler.judge_name = cfg, cfg.critic, cfg.loop.seed + 7919, "judge"
    labeler.judge = CachedJudge(theirs, "judge", 64, cfg.critic.min_label_mass)
    labeler.prompts = JudgePrompts(cfg.critic)
    labeler.model_path, labeler.offsets = "judge", {}  # no position calibration (critic.position_calibration=none)
    labels, _ = labeler.label(table)
    expected = rewards_from_labels(labels, "win_rate").to_pylist()

    ours = FakeJudge()
    reward = WinRateReward(CachedJudge(ours, "judge", 64, cfg.critic.min_label_mass), cfg.critic, cfg.loop.seed)
    rows = table.to_pylist()
    got = reward(prompts=[[{"role": "user", "content": r["prompt"]}] for r in rows],
                 completions=[[{"role": "assistant", "content": r["response"]}] for r in rows],
                 judge_prompt=[r["prompt"] for r in rows], prompt_id=[r["prompt_id"] for r in rows],
                 trainer_state=SimpleNamespace(global_step=step))
    assert ours.asked == theirs.asked and ours.asked[0]  # the same judge prompts, in the same order
    assert [g is None for g in got] == [e is None for e in expected]
    assert any(e is None for e in expected) or critic.get("pairs") == "anchor"  # the unparsable "??" sample
    assert got == pytest.approx(expected, abs=1e-6)
    assert reward.calls[0]["judge_calls"] == sum(len(a) for a in theirs.asked) + labeler.judge.hits


def test_trl_reward_pairs_follow_the_step_in_their_seed():
    """random_k pairs are drawn from the sample ids, which carry the step: another step may judge other pairs, so a
    reward that ignored TRL's global_step would not mirror the labeler."""
    from rlaif_ray.config import RunConfig
    from rlaif_lab.peer import group_sample_ids, pairwise_judge_texts

    cfg = RunConfig.model_validate({"critic": {"pairwise_labels": ["1", "2"], "pairs": "random_k", "pairs_k": 1}})
    rows = peer_batch(0).to_pylist()
    args = [r["prompt"] for r in rows], [r["response"] for r in rows], [r["prompt_id"] for r in rows]
    drawn = {tuple(pairwise_judge_texts(cfg.critic, 0, *args, group_sample_ids(s, args[2]))[0]) for s in range(8)}
    assert len(drawn) > 1


def test_model_flops_and_parameter_counts(tmp_path):
    from transformers import LlamaConfig

    from rlaif_lab.compute import flop_share, loop_flops, matmul_params

    base = dict(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=2)
    LlamaConfig(**base, tie_word_embeddings=True).save_pretrained(tmp_path / "tied")
    LlamaConfig(**base, tie_word_embeddings=False).save_pretrained(tmp_path / "untied")
    tied, untied = matmul_params(str(tmp_path / "tied")), matmul_params(str(tmp_path / "untied"))
    layer = 4 * 16 * 16 + 3 * 16 * 32 + 2 * 16          # attention, MLP, two norms
    assert tied["embedding"] == untied["embedding"] == 1600
    assert tied["total"] == 1600 + layer + 16 and tied["matmul"] == tied["total"]   # the head is the embedding
    assert untied["total"] == tied["total"] + 1600 and untied["matmul"] == untied["total"] - 1600
    f = loop_flops(10, 3, prefill_tokens=5, gen_tokens=7, judge_tokens=11, train_tokens=13, kl=0.05)
    assert f == {"gen": 2 * 10 * 12, "judge": 2 * 3 * 11, "learner": 8 * 10 * 13, "total": 240 + 66 + 1040}
    assert loop_flops(10, 3, prefill_tokens=0, gen_tokens=0, judge_tokens=0, train_tokens=13, kl=0.0)["learner"] == 780
    share = flop_share(f, 2.0, 1000.0)
    assert share["flops_per_s"]["total"] == pytest.approx(673) and share["share_of_peak"]["gen"] == pytest.approx(0.12)


@pytest.mark.parametrize("config", ["jobs/configs/toy_cpu.yaml", "jobs/configs/smol_cpu.yaml"])
def test_trl_settings_make_one_optimizer_step_one_rlaif_step(config):
    import importlib.util

    from rlaif_ray.config import load_config
    spec = importlib.util.spec_from_file_location("peer_trl", "jobs/peer_trl.py")
    peer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(peer)
    cfg = load_config(config, [])
    kwargs, deviations = peer.trl_settings(cfg, 7, "runs/x")
    batch = cfg.data.prompts_per_step * cfg.rollout.samples_per_prompt
    assert kwargs["per_device_train_batch_size"] == kwargs["generation_batch_size"] == batch  # steps_per_generation 1
    assert kwargs["num_generations"] == cfg.rollout.samples_per_prompt and "steps_per_generation" not in kwargs
    assert kwargs["max_completion_length"] == cfg.rollout.max_new_tokens and kwargs["max_steps"] == 7
    assert (kwargs["temperature"], kwargs["top_p"]) == (cfg.rollout.temperature, cfg.rollout.top_p)
    assert kwargs["beta"] == cfg.learner.kl() > 0 and kwargs["learning_rate"] == cfg.learner.learning_rate
    assert kwargs["lr_scheduler_type"] == "constant" and kwargs["scale_rewards"] == "none"  # group_mean advantage
    assert kwargs["loss_type"] == "dapo" and kwargs["shuffle_dataset"] is False
    assert any("top-p" in d for d in deviations) == (cfg.rollout.top_p < 1)


def test_peer_table_marks_the_target():
    from rlaif_lab.peer import format_peer_table

    def system(rate):
        flops = {"flops_per_s": dict.fromkeys(("gen", "judge", "learner", "total"), 1e9),
                 "share_of_peak": dict.fromkeys(("gen", "judge", "learner", "total"), 0.01)}
        return {"samples_per_s": rate, "tokens_per_s": 3 * rate, "step_seconds": 16 / rate,
                "stage_seconds": {"gen": 1.0, "train": 2.0}, "flops": flops}
    eff = {"generation": {"unit": "gen tokens/s", "in_loop": 50.0, "alone": 100.0, "efficiency": 0.5}}
    text = format_peer_table({"TRL": system(2.0), "rlaif_ray sync": system(2.5), "rlaif_ray async": system(2.8)}, eff)
    assert "rlaif_ray async / TRL samples/s: 1.40x  (target >= 1.5x: NOT met)" in text
    assert "rlaif_ray sync / TRL samples/s: 1.25x" in text and "0.50" in text
    assert "met)" in format_peer_table({"TRL": system(2.0), "rlaif_ray async": system(3.0)}, {})
