"""Parity of distillation with TRL 1.16 (skipped unless `trl` is importable): the same float64 student and teacher
(the teacher a perturbed copy of a wider model with the same tokenizer), the same prompt + completion tokens, through
our DistillationTrainer.compute_loss and TRL's DistillationTrainer._compute_loss (β = 0, 0.5, 1, temperature 1 and
0.7), and our GKDTrainer.compute_loss and TRL's GKDTrainer.compute_loss (off-policy batch: the dataset's tokens):
equal loss and equal gradient. TRL's distillation kernel projects in float32, so agreement is ~1e-7 relative."""

import copy
import warnings

import pytest
import torch

trl = pytest.importorskip("trl")

from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from posttrain.configs.distillation import DistillationConfig, GKDConfig  # noqa: E402
from posttrain.data.arith import load_builtin_dataset  # noqa: E402
from posttrain.models import teacher as teachers  # noqa: E402
from posttrain.models.builtin import builtin_model_path  # noqa: E402
from posttrain.trainers.distillation import DistillationTrainer, GKDTrainer  # noqa: E402

COMMON = dict(per_device_train_batch_size=4, max_completion_length=8, report_to="none", save_strategy="no", seed=0,
              bf16=False)


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(1)
    student = AutoModelForCausalLM.from_pretrained(builtin_model_path("posttrain/tiny"), dtype=torch.float64)
    teacher = AutoModelForCausalLM.from_pretrained(builtin_model_path("posttrain/tiny-4m"), dtype=torch.float64)
    with torch.no_grad():  # sharper, different distributions make the comparison a real test
        for p in teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return builtin_model_path("posttrain/tiny"), student, teacher


def _tokens(tok, num_rows=4, completion_len=8):
    """Same-length prompts (TRL positions tokens by index, we by the attention mask: equal without left padding),
    random completion tokens, right padding of different lengths."""
    g = torch.Generator().manual_seed(0)
    prompts = load_builtin_dataset("posttrain/arith-prompts", split=f"train[:{num_rows}]")["prompt"]
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    length = min(len(i) for i in ids)
    prompt_ids = torch.tensor([i[:length] for i in ids])
    completion_ids = torch.randint(4, len(tok), (num_rows, completion_len), generator=g)
    lengths = torch.tensor([completion_len, completion_len - 3, completion_len - 1, 2])[:num_rows]
    completion_mask = (torch.arange(completion_len)[None] < lengths[:, None]).long()
    completion_ids = completion_ids.masked_fill(completion_mask == 0, tok.pad_token_id)
    return prompt_ids, completion_ids, completion_mask


def _ours_batch(trainer, prompt_ids, completion_ids, completion_mask):
    batch = {"input_ids": torch.cat([prompt_ids, completion_ids], 1),
             "attention_mask": torch.cat([torch.ones_like(prompt_ids), completion_mask], 1),
             "completion_mask": completion_mask}
    batch.update(teachers.teacher_columns(trainer.teacher_model, batch, 4, trainer.args.teacher_top_k,
                                          trainer.divergence_temperature()))
    return batch


def _loss_and_grad(model, compute):
    model.zero_grad()
    loss = compute()
    loss.backward()
    return loss.item(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def _compare(ours, theirs):
    (our_loss, our_grad), (trl_loss, trl_grad) = ours, theirs
    assert our_loss == pytest.approx(trl_loss, rel=1e-4, abs=1e-7)
    assert our_grad.shape == trl_grad.shape
    torch.testing.assert_close(our_grad, trl_grad, rtol=1e-4, atol=1e-5 * float(trl_grad.abs().max()))


@pytest.mark.parametrize("beta,temperature", [(0.0, 1.0), (0.5, 1.0), (1.0, 1.0), (0.5, 0.7)])
def test_distillation_loss_and_gradient_match_trl(tmp_path, pair, beta, temperature):
    path, student, teacher = pair
    tok = AutoTokenizer.from_pretrained(path)
    data = load_builtin_dataset("posttrain/arith-prompts", split="train[:8]")
    options = dict(COMMON, beta=beta, temperature=temperature)
    ours = DistillationTrainer(copy.deepcopy(student), teacher_model=copy.deepcopy(teacher), processing_class=tok,
                               train_dataset=data, args=DistillationConfig(output_dir=str(tmp_path / "o"), **options))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = trl.DistillationTrainer(copy.deepcopy(student), teacher_model=copy.deepcopy(teacher),
                                         processing_class=tok, train_dataset=data,
                                         args=trl.DistillationConfig(output_dir=str(tmp_path / "t"),
                                                                     gradient_checkpointing=False, **options))
    for trainer in (ours, theirs):
        trainer.model.eval()
    prompt_ids, completion_ids, completion_mask = _tokens(tok)
    batch = _ours_batch(ours, prompt_ids, completion_ids, completion_mask)
    trl_inputs = dict(prompt_ids=prompt_ids, prompt_mask=torch.ones_like(prompt_ids), completion_ids=completion_ids,
                      completion_mask=completion_mask)
    _compare(_loss_and_grad(ours.model, lambda: ours.compute_loss(ours.model, batch)),
             _loss_and_grad(theirs.model, lambda: theirs._compute_loss(theirs.model, trl_inputs, None)[0]))


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_gkd_loss_and_gradient_match_trl(tmp_path, pair, beta):
    from trl.experimental.gkd import GKDConfig as TRLGKDConfig
    from trl.experimental.gkd import GKDTrainer as TRLGKDTrainer

    path, student, teacher = pair
    tok = AutoTokenizer.from_pretrained(path)
    data = load_builtin_dataset("posttrain/arith-sft", split="train[:8]")
    ours = GKDTrainer(copy.deepcopy(student), teacher_model=copy.deepcopy(teacher), processing_class=tok,
                      train_dataset=data, args=GKDConfig(output_dir=str(tmp_path / "o"), beta=beta, lmbda=0.0,
                                                         **COMMON))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = TRLGKDTrainer(copy.deepcopy(student), teacher_model=copy.deepcopy(teacher), processing_class=tok,
                               train_dataset=data, args=TRLGKDConfig(output_dir=str(tmp_path / "t"), beta=beta,
                                                                     lmbda=0.0, per_device_train_batch_size=4,
                                                                     report_to="none", save_strategy="no", seed=0,
                                                                     bf16=False, gradient_checkpointing=False))
    for trainer in (ours, theirs):
        trainer.model.eval()
    prompt_ids, completion_ids, completion_mask = _tokens(tok)
    batch = _ours_batch(ours, prompt_ids, completion_ids, completion_mask)
    input_ids = torch.cat([prompt_ids, completion_ids], 1)
    labels = input_ids.clone()
    labels[:, :prompt_ids.shape[1]] = -100
    labels[:, prompt_ids.shape[1]:][completion_mask == 0] = -100
    trl_inputs = dict(input_ids=input_ids, attention_mask=batch["attention_mask"], labels=labels)
    _compare(_loss_and_grad(ours.model, lambda: ours.compute_loss(ours.model, batch)),
             _loss_and_grad(theirs.model, lambda: theirs.compute_loss(theirs.model, trl_inputs)))
