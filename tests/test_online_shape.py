"""The online family's one shape: sibling configs that refuse a sibling's knob in one line, one reference component
(a given reference that cannot take effect is refused), user errors as `UserError`, and the CLI's rule that only
user errors lose their traceback."""

import dataclasses

import pytest

from posttrain import GRPOConfig, OnlineDPOConfig, PPOConfig, RLOOConfig
from posttrain.cli import is_user_error, main
from posttrain.configs.online import (
    GroupRolloutConfig,
    OnlineConfig,
    RenderedRolloutConfig,
    ScoredGroupConfig,
    ToolRolloutConfig,
)
from posttrain.errors import UserError, UserTypeError

MODEL = "posttrain/tiny"


def _fields(cls):
    return {f.name for f in dataclasses.fields(cls) if f.init}


def test_configs_are_siblings_declaring_only_what_they_use():
    for cls in (GRPOConfig, RLOOConfig):  # the trainers that take tools=, environment_factory=, rollout_func=
        assert cls.__bases__ == (ScoredGroupConfig,)
    assert ScoredGroupConfig.__bases__ == (RenderedRolloutConfig,)  # eval groups, images in the completions table
    assert RenderedRolloutConfig.__bases__ == (ToolRolloutConfig,)  # prompt rendering, completion printing
    assert ToolRolloutConfig.__bases__ == (GroupRolloutConfig,) and OnlineDPOConfig.__bases__ == (GroupRolloutConfig,)
    assert PPOConfig.__bases__ == (OnlineConfig,)
    shared = _fields(OnlineConfig)
    assert {"num_generations", "temperature", "use_vllm", "reward_funcs", "reward_weights"} <= shared
    # nothing hidden: every field a config holds can be set
    for cls in (GRPOConfig, RLOOConfig, OnlineDPOConfig, PPOConfig):
        assert all(f.init for f in dataclasses.fields(cls) if not f.name.startswith("_"))
    assert "loss_type" not in _fields(RLOOConfig) and "epsilon" not in _fields(OnlineDPOConfig)
    assert not ({"beta", "loss_type", "steps_per_generation", "num_iterations", "scale_rewards"} & _fields(PPOConfig))
    assert {"kl_coef", "vf_coef", "num_ppo_epochs"} & _fields(GRPOConfig) == set()


@pytest.mark.parametrize("cls, option, value, owners", [
    (RLOOConfig, "loss_type", "sapo", "GRPOTrainer"),
    (RLOOConfig, "scale_rewards", "none", "GRPOTrainer"),
    (OnlineDPOConfig, "epsilon", 0.3, "GRPOTrainer, PPOTrainer" if False else "GRPOTrainer"),
    (OnlineDPOConfig, "mask_truncated_completions", True, "RLOOTrainer"),
    (PPOConfig, "beta", 0.1, "GRPOTrainer"),
    (PPOConfig, "steps_per_generation", 2, "RLOOTrainer"),
    (GRPOConfig, "kl_coef", 0.1, "PPOTrainer"),
    (GRPOConfig, "normalize_advantages", True, "RLOOTrainer"),
    (OnlineDPOConfig, "max_tool_calling_iterations", 2, "GRPOTrainer, RLOOTrainer"),
    (PPOConfig, "tools", ["m:f"], "GRPOTrainer, RLOOTrainer"),
])
def test_a_sibling_knob_is_refused_naming_its_trainers(tmp_path, cls, option, value, owners):
    with pytest.raises(UserTypeError, match=f"has no option '{option}': it is used by .*{owners}") as error:
        cls(output_dir=str(tmp_path), **{option: value})
    assert "\n" not in str(error.value) and isinstance(error.value, TypeError)


def test_unknown_option_suggests_the_closest_name(tmp_path):
    with pytest.raises(TypeError, match="unexpected option 'num_generation'; did you mean 'num_generations'"):
        GRPOConfig(output_dir=str(tmp_path), num_generation=4)


def test_cli_refuses_a_sibling_knob_in_one_line(tmp_path, capsys):
    assert main(["rloo", "--loss_type", "sapo", "--output_dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unknown flag '--loss_type' for rloo: it is used by" in err and "grpo" in err
    config = tmp_path / "ppo.yaml"
    config.write_text("beta: 0.1\n")
    assert main(["ppo", "--config", str(config)]) == 2
    assert "unknown key 'beta'" in capsys.readouterr().err


def test_beta_schedule_is_a_plain_list(tmp_path):
    config = OnlineDPOConfig(output_dir=str(tmp_path), beta=[0.3, 0.1])
    assert type(config.beta) is list and config.beta_at_epoch(0) == 0.3 and config.beta_at_epoch(5) == 0.1
    assert config.to_flat_dict()["beta"] == [0.3, 0.1]


def test_reference_component_refuses_what_cannot_take_effect(tmp_path):
    from posttrain import DPOConfig, DPOTrainer, PPOTrainer
    from posttrain.data.arith import load_builtin_dataset
    from posttrain.models.loading import load_pretrained_model

    policy = load_pretrained_model(MODEL)
    prompts = load_builtin_dataset("posttrain/arith-prompts", split="train[:4]")
    common = dict(output_dir=str(tmp_path), report_to="none", per_device_train_batch_size=2)
    with pytest.raises(UserError, match="policy itself as ref_model"):
        PPOTrainer(policy, reward_funcs="length_reward", ref_model=policy, args=PPOConfig(**common),
                   train_dataset=prompts)
    with pytest.raises(UserError, match=r"uses no reference \(kl_coef is 0\)"):
        PPOTrainer(policy, reward_funcs="length_reward", ref_model=load_pretrained_model(MODEL),
                   args=PPOConfig(kl_coef=0.0, **common), train_dataset=prompts)
    pairs = load_builtin_dataset("posttrain/arith-pref", split="train[:4]")
    with pytest.raises(UserError, match="policy itself as ref_model"):
        DPOTrainer(policy, ref_model=policy, args=DPOConfig(**common), train_dataset=pairs)


def test_only_user_errors_lose_their_traceback():
    assert is_user_error(UserError("bad value")) and is_user_error(FileNotFoundError("x"))
    assert not is_user_error(TypeError("unsupported operand"))  # a bug: its traceback is shown
    assert not is_user_error(KeyError("x")) and not is_user_error(AttributeError("x"))
    try:
        import json

        json.loads("{")  # a ValueError raised by another library on what the user gave
    except ValueError as e:
        assert is_user_error(e)
    try:
        raise ValueError("an internal check")  # raised here, in a test module outside the package: a user error
    except ValueError as e:
        assert is_user_error(e)


def test_no_global_patch_until_the_public_api_is_used():
    import subprocess
    import sys

    code = ("import transformers, posttrain.trainers.grpo, posttrain.configs.ppo; "
            "print(getattr(transformers.TrainingArguments.__init__, '_posttrain_legacy', False))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"  # importing trainers and configs leaves transformers as it is


def _run_python(code: str, **env: str) -> str:
    import os
    import subprocess
    import sys

    full_env = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env=full_env).stdout.strip()


def test_training_arguments_wrapper_acts_only_on_removed_names_and_can_be_refused():
    # With the wrapper: a modern call gives exactly what transformers gives; the removed name is renamed.
    code = ("import warnings, transformers; orig = transformers.TrainingArguments.__init__\n"
            "from posttrain import SFTConfig\n"
            "from posttrain.compat import uninstall_training_arguments_aliases as un\n"
            "T = transformers.TrainingArguments; wrapped = T.__init__ is not orig\n"
            "a = T(output_dir='o', eval_strategy='steps', eval_steps=5).to_dict()\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always'); b = T(output_dir='o', evaluation_strategy='steps', eval_steps=5)\n"
            "un(); restored = T.__init__ is orig\n"
            "print(wrapped, b.eval_strategy == 'steps', len(w), restored)")
    assert _run_python(code) == "True True 1 True"
    # Turned off: transformers is untouched and the removed name fails as transformers makes it fail.
    code = ("import transformers; orig = transformers.TrainingArguments.__init__\n"
            "from posttrain import SFTConfig\n"
            "print(transformers.TrainingArguments.__init__ is orig)\n"
            "try:\n    transformers.TrainingArguments(output_dir='o', evaluation_strategy='steps')\n"
            "except TypeError:\n    print('TypeError')")
    assert _run_python(code, POSTTRAIN_LEGACY_TRAINING_ARGUMENTS="0").splitlines() == ["True", "TypeError"]
