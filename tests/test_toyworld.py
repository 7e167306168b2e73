import hashlib
from pathlib import Path

from rlaif_ray.config import CriticConfig, ToyWorldConfig
from rlaif_ray.data.checkers import is_correct
from rlaif_ray.judge.reply import label_choices
from rlaif_ray.worlds.toy import build_toy_world, make_prompts


def digest(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "toyworld.json"}


def test_checker_and_prompts():
    rows = make_prompts(3)
    assert len(rows) == 16 and rows[5] == {"id": "add-1-1", "prompt": "1+1=", "reference": "2"}
    assert is_correct(" 2", "2") and not is_correct(" 3", "2") and not is_correct(" 2", None)


def test_build_is_deterministic_given_the_seed(tmp_path):
    cfg = dict(policy_train_steps=4, critic_train_steps=4, seed=7)
    a = build_toy_world(ToyWorldConfig(cache_dir=str(tmp_path / "a"), **cfg), CriticConfig())
    b = build_toy_world(ToyWorldConfig(cache_dir=str(tmp_path / "b"), **cfg), CriticConfig())
    c = build_toy_world(ToyWorldConfig(cache_dir=str(tmp_path / "c"), **dict(cfg, seed=8)), CriticConfig())
    assert digest(a.root) == digest(b.root)
    assert digest(a.root) != digest(c.root)
    assert (a.root / "policy" / "model.safetensors").is_file() and (a.root / "critic" / "tokenizer.json").is_file()
    # cached: a second call returns the same folder without rebuilding
    again = build_toy_world(ToyWorldConfig(cache_dir=str(tmp_path / "a"), **cfg), CriticConfig())
    assert again.root == a.root


def test_toy_models_load_in_transformers(toy_world):
    from transformers import AutoConfig, AutoTokenizer
    conf = AutoConfig.from_pretrained(toy_world.policy)
    assert conf.hidden_size // conf.num_attention_heads >= 32  # vLLM's CPU attention rejects 16
    tok = AutoTokenizer.from_pretrained(toy_world.critic)
    for label in label_choices("direct")[0]:  # critic.direct_labels=auto on the toy tokenizer
        assert len(tok.encode(label, add_special_tokens=False)) == 1
