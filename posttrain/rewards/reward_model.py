"""A scalar reward model (sequence classifier, one label) wrapped as a reward function of the protocol.

Texts scored are tokenised exactly as `RewardTrainer` tokenises a pair, so an RM trained here is read at the
position it was trained at: conversational rows render prompt messages + completion messages through the reward
model's own chat template; standard rows are prompt + completion + the RM tokenizer's EOS token, with the
tokenizer's special tokens (e.g. BOS). Sequences are cut from the left to `max_length` (the end carries the answer
the score is read at), right-padded and scored in batches of `batch_size` under `torch.no_grad`, on `device` when
whoever placed the model set it (`place`: a model sharded by DeepSpeed ZeRO-3 or FSDP holds only placeholders or
shards of its parameters, so their device says nothing), else on the device of the model's first parameter. The
model may be a DeepSpeed engine or an FSDP module: only its forward is called.

Not here: loading by name (`rewards/runner.py` via `models/loading.py`), training reward models
(`trainers/reward.py`).
"""

from __future__ import annotations

from typing import Any

import torch

from posttrain.data.tokenize import tokenize_prompt_and_completions
from posttrain.errors import UserError
from posttrain.models.loading import model_short_name, prepare_tokenizer


class RewardModelScorer:
    """`scorer(prompts=…, completions=…, **kwargs) -> list[float]`: one RM score per completion."""

    def __init__(self, model: torch.nn.Module, tokenizer, batch_size: int = 32, max_length: int | None = None,
                 name: str | None = None):
        num_labels = getattr(getattr(model, "config", None), "num_labels", 1)
        if num_labels != 1:
            raise UserError(f"A reward model needs one output (num_labels=1), {model_short_name(model)!r} has "
                            f"{num_labels}. Load it with AutoModelForSequenceClassification.from_pretrained(..., "
                            "num_labels=1).")
        self.model = model.eval()
        self.tokenizer = prepare_tokenizer(tokenizer)
        tok = getattr(self.tokenizer, "tokenizer", self.tokenizer)
        # Sequence classifiers find the last real token through config.pad_token_id; without one they refuse batches.
        if getattr(model.config, "pad_token_id", None) is None:
            model.config.pad_token_id = tok.pad_token_id
        self.pad_token_id = model.config.pad_token_id
        self.batch_size, self.max_length = batch_size, max_length
        self.device: torch.device | None = None  # set by `place`; None = the device of the first parameter
        self.__name__ = name or model_short_name(model)

    def place(self, prepare, device: str | torch.device) -> None:
        """Replace the model by `prepare(model)` (moved, or wrapped for sharded inference) and score on `device`."""
        self.model = prepare(self.model)
        self.device = torch.device(device)

    def token_ids(self, prompt: Any, completion: Any) -> list[int]:
        """The ids scored for one row: `RewardTrainer`'s joint tokenisation of prompt + completion."""
        if isinstance(prompt, list) or isinstance(completion, list):
            # One side conversational: make both message lists so the chat template renders the pair.
            prompt = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
            completion = completion if isinstance(completion, list) else [{"role": "assistant", "content": completion}]
            prompt, completion = list(prompt), list(completion)
        tok = getattr(self.tokenizer, "tokenizer", self.tokenizer)
        _, (ids,) = tokenize_prompt_and_completions(tok, prompt, [completion], tok.eos_token, joint=True)
        return ids[-self.max_length:] if self.max_length is not None else ids

    def _batch(self, rows: list[list[int]], device: torch.device) -> dict[str, torch.Tensor]:
        width = max(len(ids) for ids in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, ids in enumerate(rows):
            input_ids[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention_mask[i, :len(ids)] = 1
        return {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}

    @torch.no_grad()
    def __call__(self, prompts: list, completions: list, **kwargs: Any) -> list[float]:
        rows = [self.token_ids(p, c) for p, c in zip(prompts, completions)]
        device = self.device if self.device is not None else next(self.model.parameters()).device
        scores: list[float] = []
        for start in range(0, len(rows), self.batch_size):
            logits = self.model(**self._batch(rows[start:start + self.batch_size], device)).logits
            scores.extend(logits[:, 0].float().cpu().tolist())
        return scores

    def __repr__(self) -> str:
        return f"RewardModelScorer({self.__name__!r}, batch_size={self.batch_size}, max_length={self.max_length})"
