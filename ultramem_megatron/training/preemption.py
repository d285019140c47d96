"""Stop requests (SIGTERM, SIGUSR1) honoured at a step boundary by every rank, and lost ranks."""

# Slurm sends SIGTERM on preemption (then SIGKILL after the cluster's KillWait) and, with
# `--signal=USR1@T`, SIGUSR1 T seconds before the time limit; launch/slurm.sbatch forwards its
# own warning to the ranks. The handler only records the signal: the loop asks every rank at each
# step boundary (one all-reduce), so all ranks stop after the same step and write one checkpoint.

import os
import signal
import sys
from contextlib import contextmanager
from typing import Optional

import torch
import torch.distributed as dist

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
LOST_RANK_EXIT_CODE = 3
# What gloo and NCCL say (as RuntimeError in some torch releases) when a peer is gone or frozen.
LOST_PEER_MARKERS = ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
                     "Timed out waiting", "NCCL communicator was aborted", "Watchdog caught")


class StopRequest:
    """Records SIGTERM / SIGUSR1 while installed; agreed() tells every rank whether any got one."""

    def __init__(self) -> None:
        self.received: Optional[str] = None
        self._previous: dict = {}

    def install(self) -> "StopRequest":
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._record)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _record(self, signum: int, frame) -> None:
        self.received = signal.Signals(signum).name

    def agreed(self, device: torch.device) -> Optional[str]:
        """The name of the signal any rank received (the highest-numbered, if several), else
        None. A collective: every rank must call it at the same point."""
        number = signal.Signals[self.received].value if self.received else 0
        flag = torch.tensor([number], dtype=torch.int64, device=device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return signal.Signals(int(flag.item())).name if flag.item() else None


@contextmanager
def signals_deferred():
    """Block SIGTERM / SIGUSR1 in this thread while a checkpoint is written. Helper processes the
    save starts (megatron's writer spawns a multiprocessing manager and resource tracker) inherit
    the block, so a signal Slurm sends to every process of the step cannot kill them by SIGUSR1's
    default action. This process itself keeps recording signals (StopRequest) on whichever thread
    the kernel delivers them to; the handler never interrupts the save."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def is_lost_rank_error(err: BaseException) -> bool:
    """A collective that failed because a peer died or stopped answering (gloo or NCCL)."""
    if isinstance(err, getattr(dist, "DistError", ())):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and any(marker in text for marker in LOST_PEER_MARKERS)


def exit_for_lost_rank(err: BaseException, step: Optional[int]) -> None:
    """Print what happened and leave at once: exit handlers could block on the missing peer."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    where = f" during step {step + 1}" if step is not None else ""
    first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    print(f"error: rank {rank} lost contact with another rank{where} "
          f"({type(err).__name__}: {first_line[:300]}). Another rank died or stopped answering "
          f"(the bound is train.collective_timeout_s); exiting so the job can be restarted "
          f"from its latest checkpoint.", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(LOST_RANK_EXIT_CODE)
