"""Config loading: YAML -> frozen dataclasses, overrides, and clear errors."""
import dataclasses

import pytest
import yaml

from jaxent import config as C

BASE = {"model": {"arch": {"hidden_size": 8}}, "data": {"task": "arithmetic"}}


def test_defaults_and_overrides_are_typed():
  cfg = C.from_dict(BASE, ["loss.name=kl_cov", "loss.ratio=2e-3", "loss.dual_clip=10",
                           "train.micro_batches=4", "rollout.filter_groups=true"])
  assert cfg.loss.name == "kl_cov" and cfg.loss.ratio == pytest.approx(2e-3)
  assert isinstance(cfg.loss.dual_clip, float) and cfg.loss.dual_clip == 10.0
  assert cfg.train.micro_batches == 4 and cfg.rollout.filter_groups is True
  assert cfg.rollout.max_gen_batches == 1             # default: no DAPO refill
  assert cfg.rollout.prompts_per_generate == 0        # default: a step's prompts in one sampler call
  ragged = C.from_dict(BASE, ["rollout.prompts_per_generate=5"])  # 32 = 6 x 5 + 2: ragged is fine
  assert ragged.rollout.prompts_per_generate == 5
  assert cfg.model.arch == {"hidden_size": 8}
  with pytest.raises(dataclasses.FrozenInstanceError):
    cfg.loss.ratio = 0.5  # configs are never mutated


def test_yaml_round_trip(tmp_path):
  cfg = C.from_dict(BASE, ["loss.name=clip_cov", "optim.lr=3e-5"])
  p = tmp_path / "c.yaml"
  p.write_text(cfg.to_yaml())
  again = C.load(str(p))
  assert again == cfg


@pytest.mark.parametrize("override, needle", [
    ("loss.rato=0.1", "loss.rato: unknown key; did you mean 'loss.ratio'?"),
    ("los.ratio=0.1", "los: unknown key; did you mean 'loss'?"),
    ("loss.name=grpo", "loss.name: 'grpo' is not allowed; choose one of ['ppo_clip', 'clip_cov', 'kl_cov', 'gspo', 'cispo', 'gmpo']"),
    ("optim.lr=fast", "optim.lr: expected a number, got 'fast'"),
    ("train.steps=1.5", "train.steps: expected an integer"),
    ("loss.ratio=0", "loss.ratio: must be in (0, 1]"),
    ("loss.ratio=1.5", "loss.ratio: must be in (0, 1]"),
    ("loss.kl_coef=-1", "loss.kl_coef: must be >= 0"),
    ("loss.cov_lb=6", "loss.cov_lb: must be < loss.cov_ub (5.0)"),
    ("train.mini_batches=3", "train.mini_batches: 3 does not divide the 256 responses"),
    ("train.micro_batches=3", "train.micro_batches: 3 does not divide the mini-batch of 256"),
    ("rollout.top_p=0", "rollout.top_p: must be in (0, 1]"),
    ("rollout.prompts_per_generate=-1",
     "rollout.prompts_per_generate: must be in [0, rollout.prompts_per_step = 32]"),
    ("rollout.prompts_per_generate=33", "rollout.prompts_per_generate: must be in [0, "),
    ("rollout.prompts_per_generate=2.5", "rollout.prompts_per_generate: expected an integer"),
    ("rollout.max_gen_batches=0", "rollout.max_gen_batches: must be >= 1"),
    ("rollout.max_gen_batches=4", "rollout.max_gen_batches: > 1 refills filtered groups, so it needs "
                                  "rollout.filter_groups = true"),
    ("train.progress=maybe", "train.progress: expected true or false"),
    ("nokeyvalue", "expected key=value"),
])
def test_bad_values_name_the_key(override, needle):
  with pytest.raises(C.ConfigError) as e:
    C.from_dict(BASE, [override])
  assert needle in str(e.value)


def test_model_source_must_be_exactly_one():
  with pytest.raises(C.ConfigError, match="exactly one of model.path"):
    C.from_dict({"data": {"task": "arithmetic"}})
  with pytest.raises(C.ConfigError, match="exactly one of model.path"):
    C.from_dict({"model": {"path": "/x", "arch": {}}, "data": {"task": "arithmetic"}})


def test_jsonl_task_needs_a_path():
  with pytest.raises(C.ConfigError, match="data.train_path: required"):
    C.from_dict({"model": {"path": "/x"}})


def test_load_errors(tmp_path):
  with pytest.raises(C.ConfigError, match="config file not found"):
    C.load(str(tmp_path / "missing.yaml"))
  bad = tmp_path / "bad.yaml"
  bad.write_text("model: [unclosed")
  with pytest.raises(C.ConfigError, match="not valid YAML"):
    C.load(str(bad))
  lst = tmp_path / "list.yaml"
  lst.write_text(yaml.safe_dump([1, 2]))
  with pytest.raises(C.ConfigError, match="top level must be a mapping"):
    C.load(str(lst))
