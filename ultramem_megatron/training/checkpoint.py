"""Checkpoints with megatron dist_checkpointing: atomic 'latest', keep-last-k, exact resume state."""

# Layout of run_dir/checkpoints:
#   step_0000100/      a complete dist_checkpointing directory (model, optimizer, scheduler,
#                      step, consumed samples, per-rank RNG)
#   step_0000200.tmp/  a save in progress, or one killed midway: never read, removed on start
#   latest             text: the name of the newest complete directory; replaced atomically
#                      (write + fsync + rename) only after every rank finished writing.
# With async saving the tensors are written by a forked process per rank while training goes on;
# the rename and `latest` happen in the save's finalize step, once every rank's writer is done
# (finish_pending: polled at each step boundary, waited for before a new save and at the end).
# Each step directory also holds run_config.yaml, the run's whole config, so a checkpoint is
# self-describing (scripts/export_hf.py and train.init_from read the model section from it).

import os
import random
import shutil
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import yaml
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedObject

from .. import megatron_compat
from ..config import ConfigError, RunConfig, load_config, to_dict

LATEST = "latest"
RUN_CONFIG = "run_config.yaml"
_TMP_SUFFIX = ".tmp"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not fit the run; the message says which."""


@dataclass
class TrainState:
    """What a resume needs besides the model and optimizer."""

    step: int = 0                 # optimizer steps done
    consumed_samples: int = 0     # training samples read (data position)


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
            "tracker": megatron_compat.rng_tracker_states()}


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    megatron_compat.set_rng_tracker_states(state["tracker"])


class Checkpointer:
    def __init__(self, run_dir: str | Path, keep_last: int, run: Optional[RunConfig] = None,
                 async_save: bool = False):
        self.root = Path(run_dir) / "checkpoints"
        self.keep_last = keep_last
        self.run = run
        self._queue = megatron_compat.async_save_queue() if async_save else None

    def _sharded_state(self, model, optimizer, scheduler, state: TrainState,
                       with_rng: bool = True, is_loading: bool = False) -> dict:
        model_sd = megatron_compat.model_sharded_state_dict(model)
        world = dist.get_world_size() if dist.is_initialized() else 1
        sharded = {
            "model": model_sd,
            "optimizer": megatron_compat.optimizer_sharded_state_dict(optimizer, model_sd,
                                                                      is_loading),
            "scheduler": scheduler.state_dict(),
            "train_state": {"step": state.step, "consumed_samples": state.consumed_samples},
            "world_size": world,
        }
        if with_rng:  # one RNG state per rank: restored only when the world size is unchanged
            sharded["rng"] = ShardedObject("rng_state", _rng_state(), (world,), (_rank(),),
                                           replica_id=0)
        return sharded

    def latest(self) -> Optional[Path]:
        marker = self.root / LATEST
        if not marker.is_file():
            return None
        path = self.root / marker.read_text().strip()
        if not path.is_dir():
            raise CheckpointError(f"{marker} names {path.name}, which does not exist")
        return path

    def clean_incomplete(self) -> None:
        """Remove saves that never completed (for example a process killed mid-save)."""
        if _rank() == 0 and self.root.is_dir():
            for path in self.root.glob(f"*{_TMP_SUFFIX}"):
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
        _barrier()

    def save(self, model, optimizer, scheduler, state: TrainState) -> Path:
        """Write step_N.tmp, then rename it to step_N and mark it latest. With async saving this
        returns once the state is handed to the writer processes (after waiting for the previous
        save); the rename happens in finish_pending. Every rank calls it at the same point."""
        self.finish_pending()
        name = f"step_{state.step:07d}"
        staging = self.root / f"{name}{_TMP_SUFFIX}"
        if _rank() == 0:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        _barrier()
        sharded = self._sharded_state(model, optimizer, scheduler, state)
        if self._queue is None:
            dist_checkpointing.save(sharded, str(staging))
            _barrier()
            self._commit(name)
        else:
            request = megatron_compat.start_async_save(sharded, str(staging))
            request.add_finalize_fn(partial(self._commit, name))  # after megatron's own
            self._queue.schedule_async_request(request)
        return self.root / name

    def finish_pending(self, blocking: bool = True) -> None:
        """Complete the async save in flight once every rank's writer is done (blocking: wait for
        it). A collective while a save is pending: every rank calls it at the same point."""
        if self._queue is not None:
            self._queue.maybe_finalize_async_calls(blocking=blocking)

    def _commit(self, name: str) -> None:
        """Every rank has written step_N.tmp: rename it to step_N, mark it latest, prune."""
        if _rank() == 0:
            staging, final = self.root / f"{name}{_TMP_SUFFIX}", self.root / name
            if self.run is not None:
                write_run_config(staging, self.run)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(staging, final)
            _write_atomically(self.root / LATEST, name)
            self._prune()
        _barrier()

    def _prune(self) -> None:
        complete = sorted(p for p in self.root.glob("step_*") if not p.name.endswith(_TMP_SUFFIX))
        for path in complete[:-self.keep_last]:
            shutil.rmtree(path, ignore_errors=True)

    def load(self, path: Path, model, optimizer, scheduler) -> TrainState:
        world = dist.get_world_size() if dist.is_initialized() else 1
        try:
            saved_world = dist_checkpointing.load_common_state_dict(str(path))["world_size"]
            template = self._sharded_state(model, optimizer, scheduler, TrainState(),
                                           with_rng=saved_world == world, is_loading=True)
            loaded = dist_checkpointing.load(template, str(path))
        except Exception as err:  # dist_checkpointing raises many kinds; say which checkpoint
            raise CheckpointError(f"cannot load checkpoint {path}: {err}") from err
        megatron_compat.load_model_state(model, loaded["model"])
        scheduler.mark_saved_value_groups(loaded["optimizer"])  # before the optimizer reads them
        megatron_compat.optimizer_load_state_dict(optimizer, loaded["optimizer"])
        scheduler.load_state_dict(loaded["scheduler"])  # the step; the schedule is the config's
        if "rng" in loaded:
            _set_rng_state(loaded["rng"])
        return TrainState(**loaded["train_state"])


def load_model_weights(path: Path, model) -> None:
    """Only the model's tensors from a checkpoint (a training one or a model-only one written
    by save_model_weights), resharded to this process's parallel layout."""
    try:
        loaded = dist_checkpointing.load(
            {"model": megatron_compat.model_sharded_state_dict(model)}, str(path))
    except Exception as err:  # dist_checkpointing raises many kinds; say which checkpoint
        raise CheckpointError(f"cannot load the model weights of {path}: {err}") from err
    megatron_compat.load_model_state(model, loaded["model"])


def save_model_weights(path: Path, model, run: RunConfig) -> None:
    """A model-only checkpoint (no optimizer, no step): what train.init_from starts from."""
    if _rank() == 0:
        if path.exists() and any(path.iterdir()):
            raise CheckpointError(f"{path} exists and is not empty; choose a new directory")
        path.mkdir(parents=True, exist_ok=True)
    _barrier()
    dist_checkpointing.save({"model": megatron_compat.model_sharded_state_dict(model)}, str(path))
    _barrier()
    if _rank() == 0:
        write_run_config(path, run)
    _barrier()


def write_run_config(path: Path, run: RunConfig) -> None:
    (path / RUN_CONFIG).write_text(yaml.safe_dump(to_dict(run), sort_keys=False))


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory from itself, its run's checkpoints/ directory or the run directory
    (the newest complete step of the last two)."""
    path = Path(path)
    for root in (path / "checkpoints", path):
        if (root / LATEST).is_file():
            return Checkpointer(root.parent, keep_last=1).latest()
    if (path / "metadata.json").is_file():
        return path
    raise CheckpointError(f"{path} is not a checkpoint: expected a step directory (with "
                          "metadata.json), a run directory or its checkpoints/ directory")


def read_run_config(checkpoint: Path) -> RunConfig:
    """The config a checkpoint was written with (its run_config.yaml)."""
    file = checkpoint / RUN_CONFIG
    if not file.is_file():
        raise CheckpointError(f"{checkpoint} has no {RUN_CONFIG} (checkpoints written before it "
                              "was saved with them): pass the run's config explicitly")
    try:
        return load_config(file)
    except ConfigError as err:
        raise CheckpointError(f"{file}: {err}") from None


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + _TMP_SUFFIX)
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
