"""max_tokens_per_backward on the pairwise trainers (DPO, CPO/SimPO, ORPO, reward): a micro-batch through forward
and backward in slices of whole pairs gives the update of the whole micro-batch; the slicing itself
(`trainers/slices.py`); the refusals. The online trainers' slicing is tested in test_grpo_trainer.py and
test_rloo_trainer.py."""

import pytest
import torch

from posttrain import (
    CPOConfig,
    CPOTrainer,
    DPOConfig,
    DPOTrainer,
    ORPOConfig,
    ORPOTrainer,
    RewardConfig,
    RewardTrainer,
)
from posttrain.data.arith import load_builtin_dataset
from posttrain.errors import UserError
from posttrain.trainers import slices

MODEL = "posttrain/tiny"


def _batch(lengths: list[int], pairs: bool = True) -> dict:
    rows = len(lengths)
    mask = torch.zeros(rows, max(lengths), dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    batch = {"input_ids": torch.arange(rows)[:, None].expand(-1, max(lengths)), "attention_mask": mask,
             "num_items": {"pair": torch.tensor(5.0)}, "scalar": torch.tensor(2.0)}
    if pairs:
        batch["ref_chosen_logps"] = torch.arange(rows // 2).float()
    return batch


def test_paired_slices_keep_pairs_together():
    # 3 pairs: chosen rows 0-2 (4, 4, 9 tokens), rejected rows 3-5 (2, 3, 1): pair sizes 6, 7, 10
    batch = _batch([4, 4, 9, 2, 3, 1])
    parts = slices.token_slices(batch, 13, paired=True)
    assert [p["input_ids"][:, 0].tolist() for p in parts] == [[0, 1, 3, 4], [2, 5]]
    assert [p["ref_chosen_logps"].tolist() for p in parts] == [[0.0, 1.0], [2.0]]
    assert all(p["num_items"] is batch["num_items"] and p["scalar"] is batch["scalar"] for p in parts)
    assert len(slices.token_slices(batch, 1, paired=True)) == 3  # a pair over the budget is a slice alone
    assert slices.token_slices(batch, 100, paired=True) == [batch]


def test_rows_that_cannot_be_sliced_are_refused():
    batch = {**_batch([3, 3, 3, 3], pairs=False), "pixel_values": torch.zeros(7, 3)}
    with pytest.raises(UserError, match="cannot split this batch by row"):
        slices.token_slices(batch, 3)


def _one_sgd_step(tmp_path, name, trainer_cls, config_cls, data, **options):
    """The policy after one plain-SGD step (the update is the gradient) on one micro-batch of 8 pairs."""
    args = config_cls(output_dir=str(tmp_path / name), max_steps=1, per_device_train_batch_size=8,
                      optim="sgd", learning_rate=1.0, max_grad_norm=0.0, report_to="none", save_strategy="no",
                      max_length=96, seed=0, logging_steps=1, **options)
    torch.manual_seed(0)  # the reward model's new score head starts the same in every run
    trainer = trainer_cls(MODEL, args=args, train_dataset=data)
    calls = []
    real = trainer.compute_loss
    trainer.compute_loss = lambda *a, **k: calls.append(1) or real(*a, **k)
    trainer.train()
    params = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    return params, len(calls), trainer.state.log_history[0]


def _pairs(n=8):
    return load_builtin_dataset("posttrain/arith-pref", None, split=f"train[:{n}]")


@pytest.mark.parametrize("trainer_cls,config_cls,options", [
    (DPOTrainer, DPOConfig, {}),
    (DPOTrainer, DPOConfig, {"loss_type": ["sigmoid", "sft"]}),  # RPO: the NLL's token mean spans the micro-batch
    (DPOTrainer, DPOConfig, {"loss_type": ["ipo"], "precompute_ref_log_probs": True}),
    (CPOTrainer, CPOConfig, {"loss_type": "simpo", "cpo_alpha": 0.5}),
    (ORPOTrainer, ORPOConfig, {}),
])
def test_pair_slices_give_the_same_update(tmp_path, trainer_cls, config_cls, options):
    whole, whole_calls, whole_logs = _one_sgd_step(tmp_path, "whole", trainer_cls, config_cls, _pairs(), **options)
    for budget in (1, 60):
        sliced, calls, logs = _one_sgd_step(tmp_path, f"sliced-{budget}", trainer_cls, config_cls, _pairs(),
                                            max_tokens_per_backward=budget, **options)
        worst = max(float((whole[n] - sliced[n]).abs().max()) for n in whole)
        assert worst < 1e-5, (budget, worst)
        assert logs["loss"] == pytest.approx(whole_logs["loss"], rel=1e-5)
        assert calls > whole_calls, (budget, calls)  # it did slice: 8 slices at budget 1, a few at 60
    assert whole_calls == 1


def test_reward_model_slices_give_the_same_update(tmp_path):
    data = load_builtin_dataset("posttrain/arith-pref", "standard", split="train[:8]")
    options = {"center_rewards_coefficient": 0.01}
    whole, _, _ = _one_sgd_step(tmp_path, "whole", RewardTrainer, RewardConfig, data, **options)
    sliced, calls, _ = _one_sgd_step(tmp_path, "sliced", RewardTrainer, RewardConfig, data,
                                     max_tokens_per_backward=1, **options)
    assert calls == 8
    assert max(float((whole[n] - sliced[n]).abs().max()) for n in whole) < 1e-5


def test_refusals():
    for config_cls in (DPOConfig, CPOConfig, ORPOConfig, RewardConfig):
        with pytest.raises(ValueError, match="max_tokens_per_backward must be a positive"):
            config_cls(output_dir="/tmp/x", max_tokens_per_backward=0)
        with pytest.raises(ValueError, match="max_tokens_per_backward must be a positive"):
            config_cls(output_dir="/tmp/x", max_tokens_per_backward=True)
    with pytest.raises(ValueError, match="aot losses"):
        DPOConfig(output_dir="/tmp/x", max_tokens_per_backward=512, loss_type=["aot"])
    with pytest.raises(TypeError, match="max_tokens_per_backward"):  # KTO's loss couples the batch: not offered
        from posttrain import KTOConfig

        KTOConfig(output_dir="/tmp/x", max_tokens_per_backward=512)
