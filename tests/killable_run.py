"""A small SFT, DPO, GRPO or distillation run that the reliability tests start, kill and resume (imported, or run as a script).

`python tests/killable_run.py METHOD OUTPUT_DIR [RESUME]` trains the built-in tiny model for a few steps with a
checkpoint every SAVE_STEPS steps and writes OUTPUT_DIR/losses.json (the log history) when it finishes. Env:
POSTTRAIN_TEST_STEP_SLEEP (seconds to sleep after each step, so a kill can land anywhere),
POSTTRAIN_TEST_SAVE_STEPS (checkpoint interval instead of SAVE_STEPS; checkpoints do not change the losses),
POSTTRAIN_TEST_KILL_IN_SAVE (a step: SIGKILL itself halfway through writing that step's checkpoint).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

from transformers import TrainerCallback

MODEL = "posttrain/tiny"
MAX_STEPS = 6
SAVE_STEPS = 3  # for GRPO (steps_per_generation=2) checkpoint-3 falls mid generation cycle


def _unique_chars(completions, **kwargs):
    return [float(len(set(c))) for c in completions]


class _Sleep(TrainerCallback):
    def __init__(self, seconds: float):
        self.seconds = seconds

    def on_step_end(self, args, state, control, **kwargs):
        time.sleep(self.seconds)


def build_trainer(method: str, output_dir: str, max_steps: int = MAX_STEPS, **overrides):
    """A tiny trainer of `method` ('sft', 'dpo', 'grpo', 'distillation') that logs every step and saves every SAVE_STEPS."""
    from posttrain.data.arith import load_builtin_dataset

    common = dict(output_dir=output_dir, max_steps=max_steps, logging_steps=1, save_steps=SAVE_STEPS,
                  report_to="none", seed=0, learning_rate=1e-3, per_device_train_batch_size=2)
    common.update(overrides)
    if method == "sft":
        from posttrain import SFTConfig, SFTTrainer

        data = load_builtin_dataset("posttrain/arith-sft", split="train[:32]")
        trainer = SFTTrainer(MODEL, args=SFTConfig(max_length=64, **common), train_dataset=data)
    elif method == "dpo":
        from posttrain import DPOConfig, DPOTrainer

        data = load_builtin_dataset("posttrain/arith-pref", split="train[:32]")
        trainer = DPOTrainer(MODEL, args=DPOConfig(max_length=64, **common), train_dataset=data)
    elif method == "grpo":
        from posttrain import GRPOConfig, GRPOTrainer

        # steps_per_generation 2 > GA 1: checkpoints at odd micro-steps fall mid-cycle (the buffer must be restored)
        args = GRPOConfig(num_generations=2, max_completion_length=4, steps_per_generation=2, **common)
        data = load_builtin_dataset("posttrain/arith-prompts", split="train[:32]")
        trainer = GRPOTrainer(MODEL, reward_funcs=_unique_chars, args=args, train_dataset=data)
    elif method == "distillation":
        from posttrain import DistillationConfig, DistillationTrainer

        args = DistillationConfig(max_completion_length=4, steps_per_generation=2, beta=0.5, **common)
        data = load_builtin_dataset("posttrain/arith-prompts", split="train[:32]")
        trainer = DistillationTrainer(MODEL, teacher_model="posttrain/tiny-4m", args=args, train_dataset=data)
    else:
        raise ValueError(method)
    # The run report (plots drawn at the end of every train()) is not what these tests check, and costs seconds.
    for callback in list(trainer.callback_handler.callbacks):
        if type(callback).__name__ == "RunReport":
            trainer.remove_callback(callback)
    return trainer


def losses(trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def main(argv: list[str]) -> None:
    method, output_dir = argv[0], argv[1]
    resume = argv[2] if len(argv) > 2 else None
    trainer = build_trainer(method, output_dir,
                            save_steps=int(os.environ.get("POSTTRAIN_TEST_SAVE_STEPS", SAVE_STEPS)))
    sleep = float(os.environ.get("POSTTRAIN_TEST_STEP_SLEEP", "0"))
    if sleep:
        trainer.add_callback(_Sleep(sleep))
    kill_step = int(os.environ.get("POSTTRAIN_TEST_KILL_IN_SAVE", "0"))
    if kill_step:
        save_rng = trainer._save_rng_state

        def save_rng_then_die(path):
            save_rng(path)
            if trainer.state.global_step == kill_step:
                os.kill(os.getpid(), signal.SIGKILL)  # weights and optimizer written, trainer_state.json not

        trainer._save_rng_state = save_rng_then_die
    trainer.train(resume_from_checkpoint=resume)
    with open(os.path.join(output_dir, "losses.json"), "w") as f:
        json.dump(losses(trainer), f)


if __name__ == "__main__":
    main(sys.argv[1:])
