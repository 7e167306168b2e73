import pytest

from rlaif_ray.config import ConfigError, load_config, parse_override


def test_defaults_and_dotted_overrides_are_typed():
    cfg = load_config(None, ["learner.kl_coef=0.1", "loop.mode=sync", "learner.num_learners=2"])
    assert cfg.learner.kl_coef == 0.1 and cfg.loop.mode == "sync" and cfg.learner.num_learners == 2


def test_yaml_file_then_override(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("loop:\n  num_steps: 3\nrollout:\n  samples_per_prompt: 2\n")
    cfg = load_config(path, ["loop.num_steps=5"])
    assert cfg.loop.num_steps == 5 and cfg.rollout.samples_per_prompt == 2


def test_the_repo_configs_load():
    cfg = load_config("jobs/configs/toy_cpu.yaml")
    assert cfg.learner.num_learners >= 1


@pytest.mark.parametrize("override, fragment", [
    ("learner.lr=0.1", "unknown key 'learner.lr'"),
    ("nosuchsection.x=1", "unknown key 'nosuchsection'"),
    ("loop.num_steps=many", "loop.num_steps"),
    ("loop.mode=fast", "loop.mode"),
    ("learner.num_learners=0", "learner.num_learners"),
    ("rollout.engine_streams=2", "needs loop.flow=groups"),
    ("rollout.engine_streams=17", "rollout.engine_streams"),
    ("rollout.in_flight_update=abort", "rollout.in_flight_update"),
    ("sync.delivery=pull", "sync.delivery=pull: engines load each version from the object store"),
])
def test_bad_keys_and_values_name_the_key(override, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert fragment in str(err.value)


def test_unknown_key_in_file_names_file_and_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("rollout:\n  samples_per_promt: 4\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "bad.yaml" in str(err.value) and "rollout.samples_per_promt" in str(err.value)


def test_override_syntax_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="key.path=value"):
        parse_override("loop.num_steps")
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_template_missing_placeholder_and_inconsistent_reward():
    with pytest.raises(ConfigError, match="response_b"):
        load_config(None, ["critic.pairwise_template='{prompt} {response_a} Better:'"])
    with pytest.raises(ConfigError, match="direct_score needs critic.method=direct"):
        load_config(None, ["reward.kind=direct_score"])


def test_each_engine_role_inherits_vllm_and_model_and_overrides_its_own():
    cfg = load_config(None, ["vllm.max_num_seqs=16", "model.max_model_len=512", "critic.engine.max_model_len=2048",
                             "critic.engine.gpu_memory_utilization=0.5", "rollout.engine.tensor_parallel_size=2",
                             "serve.engine.dtype=bfloat16"])
    rollout, critic, serve = (cfg.engine_for(r) for r in ("rollout", "critic", "serve"))
    assert (rollout.max_model_len, critic.max_model_len, serve.max_model_len) == (512, 2048, 512)
    assert (rollout.gpu_memory_utilization, critic.gpu_memory_utilization) == (0.2, 0.5)
    assert {e.max_num_seqs for e in (rollout, critic, serve)} == {16}
    assert (rollout.tensor_parallel_size, rollout.executor, critic.executor) == (2, "mp", "uni")
    assert (serve.dtype, rollout.dtype) == ("bfloat16", "float32")
    with pytest.raises(ConfigError, match="executor uni runs one process"):
        load_config(None, ["rollout.engine.tensor_parallel_size=2", "rollout.engine.executor=uni"])
    with pytest.raises(ConfigError, match="gpus_per_worker >= 4"):
        load_config(None, ["critic.engine.tensor_parallel_size=4", "critic.gpus_per_worker=1"])
    load_config(None, ["rollout.gpus_per_worker=0.5"])  # a fraction of a GPU per engine (colocated): TP 1 is fine
    with pytest.raises(ConfigError, match="unknown key 'rollout.engine.max_len'"):
        load_config(None, ["rollout.engine.max_len=4"])


def test_learner_memory_settings_resolve_and_refuse_clearly():
    from rlaif_ray.stages.learner import core_settings

    cfg = load_config(None, [])
    assert cfg.model.dtype == "float32" and cfg.learner.kl() == 0.05 and cfg.learner.micro_batch_tokens > 0
    assert cfg.learner.reference_placement() == "rank"
    gpu = load_config(None, ["learner.gpus_per_learner=1", "learner.zero_stage=3"])
    assert gpu.model.dtype == "bfloat16" and gpu.learner.reference_placement() == "sharded"
    dpo = load_config(None, ["learner.algorithm=dpo"])
    assert dpo.learner.kl() == 0.0 and dpo.learner.reference_placement() == "rank"  # β alone; the ratio needs π_ref
    assert load_config(None, ["learner.kl_coef=0"]).learner.reference_placement() == "none"
    assert load_config(None, ["learner.lora.rank=8"]).learner.reference_placement() == "adapter"
    settings = core_settings(load_config(None, ["loop.num_steps=7", "learner.ppo_epochs=2", "learner.lr_schedule=cosine"]))
    assert settings.total_steps == 14 and settings.lr_schedule == "cosine"
    for overrides, fragment in (
            (["learner.colocate=true"], "needs CUDA"),
            (["learner.colocate=true", "learner.gpus_per_learner=0.5"], "loop.mode=sync"),
            (["learner.reference=none", "learner.algorithm=dpo"], "learner.reference=none"),
            (["learner.reference=rank", "learner.zero_stage=3"], "sharded"),
            (["learner.offload_params=true"], "zero_stage 3")):
        with pytest.raises(ConfigError, match=fragment):
            load_config(None, overrides)


@pytest.mark.parametrize("script", ["benchmark.py", "feedback_study.py", "injection_study.py", "peer_trl.py",
                                    "claims_study.py"])
def test_job_scripts_take_overrides_anywhere_on_the_line(script, tmp_path):
    """Options after dotted overrides are still options: the run stops on the bad key, not on argparse."""
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, f"jobs/{script}", "-c", "jobs/configs/toy_cpu.yaml", "loop.num_steps=60",
                           "--out", str(tmp_path / "out"), "learner.no_such_key=1"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "unrecognized arguments" not in proc.stderr, proc.stderr[-2000:]
    assert "learner.no_such_key" in proc.stderr + proc.stdout


@pytest.mark.parametrize("overrides, message", [
    (["rollout.gpus_per_worker=0.5", "vllm.gpu_memory_utilization=0.9"], "more than the engine's share"),
    (["rollout.gpus_per_worker=2", "vllm.tensor_parallel_size=2", "vllm.executor=ray"], "executor=ray is not supported on GPUs"),
    (["serve.gpus_per_replica=2"], "serve.engine.tensor_parallel_size=2"),
])
def test_gpu_settings_vllm_would_reject_are_refused_with_the_field(overrides, message):
    """Issue 26: settings that would fail inside vLLM on a GPU node are refused when the config loads."""
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_engines_take_the_cpu_backend_variables_only_without_a_gpu():
    """The runtime_env is computed on the driver; a GPU engine must not get vLLM's CPU-backend variables because the
    head node has no GPU (issue 26), and GPU engines default to CUDA graphs."""
    from rlaif_ray.engine import eager, engine_env
    cpu = load_config(None, [])
    gpu = load_config(None, ["rollout.gpus_per_worker=1", "learner.gpus_per_learner=1"])
    assert "VLLM_CPU_KVCACHE_SPACE" in engine_env(cpu.engine_for("rollout"))
    assert "VLLM_CPU_KVCACHE_SPACE" not in engine_env(gpu.engine_for("rollout"))
    assert eager(cpu.engine_for("rollout")) and not eager(gpu.engine_for("rollout"))
    assert eager(load_config(None, ["rollout.gpus_per_worker=1", "vllm.enforce_eager=true"]).engine_for("rollout"))
    # an eager CPU engine runs vLLM's own torch.compile'd helpers as plain torch; GPU engines, and a CPU engine that
    # asks for vLLM's compiled path, keep torch.compile
    assert engine_env(cpu.engine_for("rollout"))["TORCHDYNAMO_DISABLE"] == "1"
    assert "TORCHDYNAMO_DISABLE" not in engine_env(gpu.engine_for("rollout"))
    assert "TORCHDYNAMO_DISABLE" not in engine_env(load_config(None, ["vllm.enforce_eager=false"]).engine_for("rollout"))
