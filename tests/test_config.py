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
