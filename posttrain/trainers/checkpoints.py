"""Crash-safe checkpoints and resuming, mixed into `PostTrainer`.

A checkpoint is written to `<output_dir>/incomplete-checkpoint-N`, its files are flushed to disk, and only then is
the directory renamed to `checkpoint-N` (a rename within one directory is atomic). So a run killed at any moment
leaves either a complete `checkpoint-N` or an `incomplete-…` directory that nothing reads (the next `train()`
removes it). Rotation (`save_total_limit`) renames a checkpoint to `deleting-checkpoint-N` before deleting it, so a
crash mid-delete cannot leave a half-deleted `checkpoint-N` either. Neither prefix matches transformers'
`checkpoint-*` glob.

Resuming: `train(resume_from_checkpoint=...)` and the CLI's `--resume_from_checkpoint` take a checkpoint path, a
run directory (its newest complete checkpoint), True / "true" / "latest" (the newest complete checkpoint in
output_dir; an error when there is none) or "auto" (the same, or a fresh start when there is none). Besides
transformers' files (weights, optimizer, scheduler, RNG states, trainer_state.json) a checkpoint holds
`posttrain_state.pt` (one per process when distributed): the metric store not yet logged, the token count and
whatever `checkpoint_state()` of a subclass adds (the online trainers' rollout buffer), so a resumed run continues
exactly where the interrupted one stood.

Not here: what goes into the model files (transformers' `save_model`), the refusal to save non-finite weights
(`trainers/numerics.py`), Ctrl-C handling (`trainers/interrupt.py`).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from typing import Any

import torch
from transformers.trainer_callback import TrainerState
from transformers.trainer_utils import SaveStrategy, TrainOutput

from posttrain.errors import UserError

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")
STAGING_PREFIX = "incomplete-"
DELETING_PREFIX = "deleting-"
STATE_NAME = "posttrain_state.pt"
_COMPLETE_MARKER = "trainer_state.json"  # written last by transformers and by us; a checkpoint without it is not one
_LATEST = ("true", "latest", "last")


def complete_checkpoints(output_dir: str) -> list[str]:
    """Paths of the complete `checkpoint-N` directories in output_dir, oldest (smallest N) first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        match = CHECKPOINT_NAME.match(name)
        path = os.path.join(output_dir, name)
        if match and os.path.isfile(os.path.join(path, _COMPLETE_MARKER)):
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def latest_checkpoint(output_dir: str) -> str | None:
    """The newest complete checkpoint in output_dir, or None. Partial and staging directories are ignored."""
    checkpoints = complete_checkpoints(output_dir)
    return checkpoints[-1] if checkpoints else None


def remove_stale(output_dir: str) -> list[str]:
    """Delete staging and half-deleted directories left by a run that crashed; returns what was removed."""
    if not os.path.isdir(output_dir):
        return []
    removed = []
    for name in sorted(os.listdir(output_dir)):
        if name.startswith((STAGING_PREFIX + "checkpoint-", DELETING_PREFIX + "checkpoint-")):
            path = os.path.join(output_dir, name)
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    if removed:
        logger.info("Removed %d incomplete checkpoint director%s left by an earlier run: %s", len(removed),
                    "y" if len(removed) == 1 else "ies", ", ".join(removed))
    return removed


def resolve_resume(value: Any, output_dir: str) -> str | None:
    """The checkpoint directory that `resume_from_checkpoint=value` names, or None for a fresh start.

    None/False/""/"false" → None. True/"true"/"latest" → the newest complete checkpoint in output_dir (ValueError if
    there is none). "auto" → the same, or None. A path: a checkpoint directory, or a run directory whose newest
    complete checkpoint is used."""
    if value is None or value is False:
        return None
    text = str(value).strip()
    if text.lower() in ("", "false", "none", "no"):
        return None
    if value is True or text.lower() in _LATEST + ("auto",):
        found = latest_checkpoint(output_dir)
        if found is None and text.lower() != "auto":
            raise UserError(f"resume_from_checkpoint={text!r} but output_dir {output_dir!r} holds no complete "
                            "checkpoint; pass a checkpoint path, 'auto' (resume if one exists), or drop the option "
                            "to start fresh.")
        if found is not None:
            logger.info("Resuming from the newest complete checkpoint: %s", found)
        return found
    if not os.path.isdir(text):
        raise FileNotFoundError(f"resume_from_checkpoint {text!r} does not exist; pass a checkpoint directory "
                                "(…/checkpoint-N) or 'latest' for the newest one in output_dir.")
    if os.path.isfile(os.path.join(text, _COMPLETE_MARKER)):
        return text
    found = latest_checkpoint(text)
    if found is not None:
        return found
    raise UserError(f"resume_from_checkpoint {text!r} is not a complete checkpoint (no {_COMPLETE_MARKER}; a run "
                    "killed while writing it leaves such a directory) and holds none; pass a complete "
                    "…/checkpoint-N directory or 'latest'.")


def check_checkpoint_files(checkpoint: str) -> None:
    """One line naming the file when a checkpoint's state, weights or optimizer file is truncated or corrupt (a disk
    that filled up, a copy cut short), instead of a JSON, safetensors or zip error deep inside transformers."""
    import json
    import zipfile

    def bad(name: str, why: str) -> UserError:
        return UserError(f"{os.path.join(checkpoint, name)} is {why}; the checkpoint is damaged: resume from an "
                         "earlier checkpoint (…/checkpoint-N) or start fresh.")

    try:
        with open(os.path.join(checkpoint, _COMPLETE_MARKER)) as f:
            json.load(f)
    except (OSError, ValueError) as e:
        raise bad(_COMPLETE_MARKER, f"not readable JSON ({e})") from None
    for name in sorted(os.listdir(checkpoint)):
        path = os.path.join(checkpoint, name)
        if name.endswith(".safetensors"):
            from safetensors import safe_open

            try:
                with safe_open(path, framework="pt") as f:
                    for key in f.keys():
                        f.get_slice(key)  # reads headers only; a cut file fails on offsets past its end
                if os.path.getsize(path) < _safetensors_end(path):
                    raise ValueError("shorter than its header says")
            except Exception as e:  # safetensors raises its own error types
                raise bad(name, f"truncated or corrupt ({str(e).splitlines()[0][:80]})") from None
        elif name.endswith((".pt", ".bin")) and os.path.isfile(path) and not zipfile.is_zipfile(path):
            raise bad(name, "truncated or corrupt (not a complete torch archive)")


def _safetensors_end(path: str) -> int:
    """The byte length a safetensors file's header says it has."""
    import json
    import struct

    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    return 8 + size + max(ends, default=0)


def _fsync_tree(path: str) -> None:
    """Flush every file under path and the directories themselves to disk (so a power cut after the rename cannot
    leave a complete-looking checkpoint with empty files)."""
    for root, _, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(root)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories; the rename is still atomic there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def delete_checkpoint(path: str) -> None:
    """Rename aside, then delete: a crash mid-delete leaves a `deleting-…` directory, never a partial checkpoint."""
    parent, name = os.path.split(path.rstrip(os.sep))
    doomed = os.path.join(parent, DELETING_PREFIX + name)
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def publish(staging: str, final: str) -> None:
    """Sync staging to disk and rename it to final (replacing an older final of the same name)."""
    _fsync_tree(staging)
    if os.path.isdir(final):
        delete_checkpoint(final)
    os.replace(staging, final)
    _fsync_dir(os.path.dirname(final) or ".")


def rotate(output_dir: str, limit: int | None, keep: tuple[str | None, ...] = ()) -> list[str]:
    """Delete the oldest complete checkpoints beyond `limit`, never the newest one nor those in `keep` (the best
    checkpoint). Returns the deleted paths."""
    if not limit or limit <= 0:
        return []
    checkpoints = complete_checkpoints(output_dir)
    protected = {os.path.abspath(checkpoints[-1])} if checkpoints else set()
    protected |= {os.path.abspath(p) for p in keep if p}
    excess = len(checkpoints) - max(limit, len(protected))
    deleted = []
    for path in checkpoints:
        if excess <= 0:
            break
        if os.path.abspath(path) not in protected:
            delete_checkpoint(path)
            deleted.append(path)
            excess -= 1
    return deleted


class CrashSafeCheckpoints:
    """Mixin for `transformers.Trainer` subclasses: atomic checkpoints, resume resolution, extra trainer state.

    Subclasses extend `checkpoint_state()` / `load_checkpoint_state()` (call super) for state that lives outside
    the model, optimizer and RNGs."""

    last_checkpoint: str | None = None  # the newest checkpoint this trainer wrote

    # ---- extra state ------------------------------------------------------------------------------------------
    def checkpoint_state(self) -> dict[str, Any]:
        """State saved in each checkpoint beside transformers' own (tensors, numbers, lists and dicts only)."""
        state: dict[str, Any] = {}
        metrics = getattr(self, "_metrics", None)
        if metrics is not None:  # PostTrainer's store: values recorded since the last log
            state["metrics"] = {k: list(v) for k, v in metrics["train"].items()}
        for name in ("_num_tokens", "_new_tokens", "_nonfinite_total", "_nonfinite_streak"):
            if hasattr(self, name):
                state[name] = getattr(self, name)
        return state

    def load_checkpoint_state(self, state: dict[str, Any]) -> None:
        """Restore what `checkpoint_state()` saved."""
        metrics = getattr(self, "_metrics", None)
        if metrics is not None and "metrics" in state:
            metrics["train"].clear()
            metrics["train"].update({k: list(v) for k, v in state["metrics"].items()})
        for name in ("_num_tokens", "_new_tokens", "_nonfinite_total", "_nonfinite_streak"):
            if name in state:
                setattr(self, name, state[name])

    def _state_file(self, checkpoint: str) -> str:
        name = STATE_NAME if self.args.world_size <= 1 else f"posttrain_state_{self.args.process_index}.pt"
        return os.path.join(checkpoint, name)

    def _load_extra_state(self, checkpoint: str) -> None:
        path = self._state_file(checkpoint)
        if not os.path.isfile(path):
            logger.info("%s has no %s (written by another tool?): metrics not yet logged and online rollout "
                        "buffers start empty.", checkpoint, os.path.basename(path))
            return
        self.load_checkpoint_state(torch.load(path, map_location=self.args.device, weights_only=True))

    # ---- transformers hooks -----------------------------------------------------------------------------------
    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, ignore_keys_for_eval=None,
              **kwargs: Any):
        """`transformers.Trainer.train`, with resume_from_checkpoint also taking "latest"/"auto" or a run directory
        (see the module docstring) and incomplete checkpoints of a crashed run cleaned up first."""
        checkpoint = resolve_resume(resume_from_checkpoint, self.args.output_dir)
        if self.args.should_save:
            remove_stale(self.args.output_dir)
        if checkpoint is None:
            self._claim_output_dir()
        if checkpoint is not None:
            check_checkpoint_files(checkpoint)
            self._load_extra_state(checkpoint)
            if self._already_finished(checkpoint):
                return self._restore_finished(checkpoint)
        try:
            return super().train(resume_from_checkpoint=checkpoint, trial=trial,
                                 ignore_keys_for_eval=ignore_keys_for_eval, **kwargs)
        except RuntimeError as e:
            if checkpoint is not None and "size mismatch" in str(e):
                raise UserError(f"{checkpoint} was saved from a model of another shape than this run's "
                                f"({str(e).splitlines()[-1].strip()[:160]}); resume with the model it was trained "
                                "from, or start fresh in another output_dir.") from e
            raise

    def _claim_output_dir(self) -> None:
        """A fresh run: refuse an output_dir holding an earlier run's checkpoints (they would mix with this run's,
        and `latest` could pick theirs), unless overwrite_output_dir, which deletes them first. An output_dir the
        user did not choose (the default '<model>-<Method>', which the guides' snippets share) is overwritten, with a
        warning: its final model is replaced by this run's anyway."""
        earlier = complete_checkpoints(self.args.output_dir)
        if not earlier:
            return
        names = ", ".join(os.path.basename(c) for c in earlier[-3:])
        chosen = not getattr(self.args, "_output_dir_was_default", False)
        if chosen and not getattr(self.args, "overwrite_output_dir", False):
            raise UserError(f"output_dir {self.args.output_dir!r} already holds checkpoints of an earlier run "
                            f"({names}); continue it with --resume_from_checkpoint latest, choose another "
                            "output_dir, or pass --overwrite_output_dir True to delete them first.")
        if self.args.should_save:
            for path in earlier:
                delete_checkpoint(path)
            logger.warning("overwrite_output_dir: deleted %d checkpoint(s) of an earlier run in %s (%s).",
                           len(earlier), self.args.output_dir, names)

    def _already_finished(self, checkpoint: str) -> bool:
        saved = TrainerState.load_from_json(os.path.join(checkpoint, _COMPLETE_MARKER))
        target = self.args.max_steps if self.args.max_steps > 0 else saved.max_steps
        return bool(target) and saved.global_step >= target

    def _restore_finished(self, checkpoint: str) -> TrainOutput:
        """Resuming a run that already reached its last step: load its weights and state, train nothing (transformers
        would train one step past max_steps)."""
        logger.warning("%s is already at the last step; nothing left to train (raise max_steps to continue).",
                       checkpoint)
        self._load_from_checkpoint(checkpoint)
        self.state = TrainerState.load_from_json(os.path.join(checkpoint, _COMPLETE_MARKER))
        last = next((h for h in reversed(self.state.log_history) if "train_loss" in h), {})
        return TrainOutput(self.state.global_step, last.get("train_loss", float("nan")), {})

    def _save_checkpoint(self, model, trial) -> None:
        """transformers' checkpoint contents, written aside and renamed into place once complete."""
        args = self.args
        run_dir = self._get_output_dir(trial=trial)
        name = f"checkpoint-{self.state.global_step}"
        final, staging = os.path.join(run_dir, name), os.path.join(run_dir, STAGING_PREFIX + name)
        if args.should_save and os.path.isdir(staging):
            shutil.rmtree(staging)
        self.accelerator.wait_for_everyone()
        if self.hp_search_backend is None and trial is None:
            self.store_flos()
        try:
            self.save_model(staging, _internal_call=True)
            if not args.save_only_model:
                self._save_optimizer_and_scheduler(staging)
                self._save_scaler(staging)
                self._save_rng_state(staging)
            os.makedirs(staging, exist_ok=True)
            torch.save(self.checkpoint_state(), self._state_file(staging))
            self.accelerator.wait_for_everyone()
            if args.should_save:
                self._record_best_checkpoint(run_dir)
                self._export_callback_states()
                self.state.save_to_json(os.path.join(staging, _COMPLETE_MARKER))
                publish(staging, final)
        except BaseException:
            if args.should_save:
                shutil.rmtree(staging, ignore_errors=True)
            raise
        self.accelerator.wait_for_everyone()
        self.last_checkpoint = final
        if args.push_to_hub:
            self._push_from_checkpoint(final)
        if args.should_save:
            rotate(run_dir, args.save_total_limit, keep=(self.state.best_model_checkpoint,))

    def _record_best_checkpoint(self, run_dir: str) -> None:
        """As transformers does: point state.best_model_checkpoint at the best step's checkpoint once it exists."""
        best_step = self.state.best_global_step
        if not best_step or self.args.save_strategy not in (SaveStrategy.STEPS, SaveStrategy.EPOCH,
                                                            SaveStrategy.BEST):
            return
        best = os.path.join(run_dir, f"checkpoint-{best_step}")
        if best_step == self.state.global_step or os.path.isdir(best):
            self.state.best_model_checkpoint = best

    def _export_callback_states(self) -> None:
        """Store the state of stateful callbacks (early stopping, …) in the trainer state, as transformers does."""
        from transformers.trainer_callback import ExportableState

        for callback in self.callback_handler.callbacks + [self.control]:
            if not isinstance(callback, ExportableState):
                continue
            name = type(callback).__name__
            if isinstance(self.state.stateful_callbacks.get(name), list):
                self.state.stateful_callbacks[name].append(callback.state())
            else:
                self.state.stateful_callbacks[name] = callback.state()
