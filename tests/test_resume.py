"""Crash safety and resuming: runs killed with SIGKILL at random moments (and halfway through writing a checkpoint)
resume from the newest complete checkpoint and reproduce the uninterrupted run's loss trajectory exactly, for SFT,
DPO and GRPO (whose rollout buffer and sampling RNG must come back); same seed → same losses; resume_from_checkpoint
forms; save_total_limit rotation; Ctrl-C in the CLI saves a checkpoint and exits 130."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
from killable_run import build_trainer, losses

from posttrain.trainers import checkpoints

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "killable_run.py")
_REFERENCE: dict[str, list[float]] = {}


def _env(**extra):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               WANDB_MODE="disabled", PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), HERE]))
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _reference(method, tmp_path_factory):
    """The uninterrupted run's losses (computed once per method per session)."""
    if method not in _REFERENCE:
        trainer = build_trainer(method, str(tmp_path_factory.mktemp(f"ref-{method}")))
        trainer.train()
        _REFERENCE[method] = losses(trainer)
    return _REFERENCE[method]


def _start(method, out, resume=None, **env):
    args = [sys.executable, SCRIPT, method, str(out)] + ([resume] if resume else [])
    return subprocess.Popen(args, env=_env(**env), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _kill_at_random(proc, out, rng, after_step=0, window=1.5):
    """SIGKILL `proc` a random moment after a complete checkpoint past `after_step` exists; returns that step."""
    deadline = time.time() + 240
    while time.time() < deadline:
        latest = checkpoints.latest_checkpoint(str(out))
        if latest and int(latest.rsplit("-", 1)[1]) > after_step:
            break
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before it could be killed: {proc.stderr.read()[-2000:]}")
        time.sleep(0.05)
    time.sleep(rng.uniform(0, window))
    proc.kill()
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before the kill"
    latest = checkpoints.latest_checkpoint(str(out))
    return int(latest.rsplit("-", 1)[1])


def _resume_in_process(method, out):
    trainer = build_trainer(method, str(out))
    trainer.train(resume_from_checkpoint="latest")
    return losses(trainer)


@pytest.mark.parametrize("method", [pytest.param("sft", marks=pytest.mark.slow),
                                    pytest.param("dpo", marks=pytest.mark.slow), "grpo"])
def test_same_seed_same_losses_and_resume_mid_run(method, tmp_path):
    """Run twice with the same seed: identical losses. Then resume from the step-3 checkpoint — for GRPO mid
    generation cycle (steps_per_generation=2), so the saved rollout buffer is what the resumed step trains on —
    and get the same losses again."""
    first = build_trainer(method, str(tmp_path / "first"), max_steps=4)
    first.train()
    second = build_trainer(method, str(tmp_path / "second"), max_steps=4)
    second.train()
    assert losses(second) == losses(first) and len(losses(first)) == 4
    resumed = build_trainer(method, str(tmp_path / "second"), max_steps=4)
    resumed.train(resume_from_checkpoint=str(tmp_path / "second" / "checkpoint-3"))
    assert losses(resumed) == losses(first)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["sft", "dpo", "grpo"])
def test_killed_run_resumes_to_the_same_losses(method, tmp_path, tmp_path_factory):
    reference = _reference(method, tmp_path_factory)
    out = tmp_path / "run"
    proc = _start(method, out, POSTTRAIN_TEST_STEP_SLEEP=0.3, POSTTRAIN_TEST_SAVE_STEPS=1)
    killed_after = _kill_at_random(proc, out, random.Random(f"{method}-1"))
    assert killed_after < len(reference)
    resumed = _resume_in_process(method, out)
    assert resumed == reference, (killed_after, resumed, reference)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["sft", "dpo", "grpo"])
def test_three_kills_then_resume_reproduce_the_trajectory(method, tmp_path, tmp_path_factory):
    """Kill, resume-and-kill, resume-and-kill, resume to the end: three random kill points in one trajectory."""
    reference = _reference(method, tmp_path_factory)
    out, rng, resume, step = tmp_path / "run", random.Random(f"{method}-3"), None, 0
    kill_points = []
    for _ in range(3):
        proc = _start(method, out, resume, POSTTRAIN_TEST_STEP_SLEEP=0.3, POSTTRAIN_TEST_SAVE_STEPS=1)
        step = _kill_at_random(proc, out, rng, after_step=step, window=0.6)
        kill_points.append(step)
        resume = "latest"
    resumed = _resume_in_process(method, out)
    diff = max(abs(a - b) for a, b in zip(resumed, reference))
    print(f"{method}: kill points after checkpoints {kill_points}, max |Δloss| = {diff}")
    assert len(resumed) == len(reference) and diff == 0.0, (kill_points, resumed, reference)


def test_kill_while_writing_a_checkpoint_leaves_the_previous_one(tmp_path):
    out = tmp_path / "run"
    proc = _start("sft", out, POSTTRAIN_TEST_KILL_IN_SAVE=4, POSTTRAIN_TEST_SAVE_STEPS=2)
    proc.wait(timeout=240)
    assert proc.returncode == -signal.SIGKILL
    names = sorted(os.listdir(out))
    assert "checkpoint-2" in names and "checkpoint-4" not in names and "incomplete-checkpoint-4" in names
    assert checkpoints.latest_checkpoint(str(out)).endswith("checkpoint-2")
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        checkpoints.resolve_resume(str(out / "incomplete-checkpoint-4"), str(out))
    resumed = build_trainer("sft", str(out))
    resumed.train(resume_from_checkpoint="latest")  # the trajectory itself: test_three_kills_… (slow)
    assert len(losses(resumed)) == resumed.state.global_step == 6
    assert not [n for n in os.listdir(out) if n.startswith("incomplete-")]  # cleaned up by the resumed run


def test_resume_forms_and_rotation(tmp_path):
    out = tmp_path / "run"
    trainer = build_trainer("sft", str(out), save_steps=2, save_total_limit=2)
    trainer.train()
    assert sorted(n for n in os.listdir(out) if "checkpoint" in n) == ["checkpoint-4", "checkpoint-6"]
    assert trainer.last_checkpoint == str(out / "checkpoint-6")
    (out / "checkpoint-9").mkdir()  # no trainer_state.json: not complete, never chosen
    (out / "incomplete-checkpoint-8").mkdir()
    for value in (True, "true", "latest", "auto", str(out)):
        assert checkpoints.resolve_resume(value, str(out)) == str(out / "checkpoint-6")
    assert checkpoints.resolve_resume(str(out / "checkpoint-4"), str(out)) == str(out / "checkpoint-4")
    for value in (None, False, "", "false"):
        assert checkpoints.resolve_resume(value, str(out)) is None
    empty = tmp_path / "empty"
    assert checkpoints.resolve_resume("auto", str(empty)) is None
    with pytest.raises(ValueError, match="holds no complete checkpoint; pass a checkpoint path, 'auto'"):
        checkpoints.resolve_resume("latest", str(empty))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        checkpoints.resolve_resume(str(tmp_path / "nope"), str(out))
    # resuming at the last step trains nothing more and keeps the history
    again = build_trainer("sft", str(out), save_steps=2, save_total_limit=2)
    again.train(resume_from_checkpoint=True)
    assert losses(again) == losses(trainer)
    assert not (out / "incomplete-checkpoint-8").exists()


def test_ctrl_c_saves_a_checkpoint_and_exits_130(tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "posttrain", "sft", "--model_name_or_path", "posttrain/tiny", "--dataset_name",
           "posttrain/arith-sft", "--dataset_train_split", "train[:64]", "--output_dir", str(out), "--max_steps",
           "400", "--save_strategy", "no",
           "--per_device_train_batch_size", "2", "--max_length", "64", "--report_to", "none"]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not (out / "config.yaml").exists():  # written after the first optimizer step
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-2000:]
    last = stderr.strip().splitlines()[-1]
    saved = checkpoints.latest_checkpoint(str(out))
    assert saved is not None and last.startswith("posttrain sft: interrupted at step ")
    assert f"checkpoint saved to {saved} (continue with --resume_from_checkpoint {saved})" in last
    state = json.load(open(os.path.join(saved, "trainer_state.json")))
    assert 1 <= state["global_step"] < 400


def _unique_chars(completions, **kwargs):
    return [float(len(set(c))) / 10 for c in completions]


def test_ppo_resumes_mid_rollout(tmp_path):
    """PPO reuses one rollout for num_ppo_epochs passes: checkpoint-1 falls inside it, so the saved rollout, KL
    coefficient and episode count must come back for the resumed steps to match."""
    from posttrain import PPOConfig, PPOTrainer
    from posttrain.data.arith import load_builtin_dataset

    def make():
        args = PPOConfig(output_dir=str(tmp_path / "out"), max_steps=3, per_device_train_batch_size=4,
                         num_mini_batches=2, num_ppo_epochs=2, max_completion_length=6, learning_rate=1e-3,
                         logging_steps=1, report_to="none", save_steps=1, seed=0, disable_tqdm=True)
        return PPOTrainer("posttrain/tiny", reward_funcs=_unique_chars, args=args,
                          train_dataset=load_builtin_dataset("posttrain/arith-prompts", split="train[:8]"))

    full = make()
    full.train()
    resumed = make()
    resumed.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-1"))
    assert losses(resumed) == losses(full)
    assert [h["episode"] for h in resumed.state.log_history if "loss" in h] == \
        [h["episode"] for h in full.state.log_history if "loss" in h]


def test_sigterm_saves_a_checkpoint_and_stops(tmp_path):
    """What a scheduler sends before preempting: the same as Ctrl-C, in-process here (a callback signals itself)."""
    from transformers import TrainerCallback

    from posttrain.trainers.interrupt import TrainingInterrupted

    class SignalAtStep2(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 1:
                os.kill(os.getpid(), signal.SIGTERM)

    out = tmp_path / "out"
    trainer = build_trainer("sft", str(out), save_strategy="no")
    trainer.add_callback(SignalAtStep2())
    before = signal.getsignal(signal.SIGTERM)
    expected = (r"^stopped by SIGTERM at step 2; checkpoint saved to .*checkpoint-2 \(continue with "
                r"--resume_from_checkpoint .*checkpoint-2\)$")
    with pytest.raises(TrainingInterrupted, match=expected) as info:
        trainer.train()
    assert info.value.signum == signal.SIGTERM and info.value.checkpoint == str(out / "checkpoint-2")
    assert checkpoints.latest_checkpoint(str(out)) == str(out / "checkpoint-2")
    assert signal.getsignal(signal.SIGTERM) is before  # handlers restored
