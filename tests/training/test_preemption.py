"""Stop signals are recorded and agreed, helper processes of a checkpoint write are shielded from
them, and lost peers are told apart from other errors."""

import os
import signal
import subprocess
import sys

import torch
import torch.distributed as dist

from ultramem_megatron.training.preemption import (StopRequest, is_lost_rank_error,
                                                   signals_deferred)


def blocked_signals(pid: int) -> set[int]:
    mask = int(next(line.split()[1] for line in open(f"/proc/{pid}/status")
                    if line.startswith("SigBlk:")), 16)
    return {number for number in range(1, 65) if mask >> (number - 1) & 1}


def test_signal_is_recorded_and_agreed_not_fatal():
    stop = StopRequest().install()
    try:
        assert stop.agreed(torch.device("cpu")) is None
        signal.raise_signal(signal.SIGUSR1)   # would end the process by default
        assert stop.received == "SIGUSR1"
        assert stop.agreed(torch.device("cpu")) == "SIGUSR1"
        signal.raise_signal(signal.SIGTERM)
        assert stop.received == "SIGTERM"
    finally:
        stop.uninstall()
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL


def test_helpers_started_during_a_save_ignore_stop_signals():
    with signals_deferred():
        helper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert {signal.SIGTERM, signal.SIGUSR1} <= blocked_signals(helper.pid)
        assert signal.SIGUSR1 not in blocked_signals(os.getpid())   # restored here
    finally:
        helper.kill()
        helper.wait()


def test_lost_peer_errors_are_told_apart_from_bugs():
    gloo_reset = RuntimeError("[gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:59825: "
                              "Connection reset by peer. This is typically caused by ...")
    gloo_timeout = RuntimeError("[gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting "
                                "15000ms for recv operation to complete")
    assert is_lost_rank_error(gloo_reset) and is_lost_rank_error(gloo_timeout)
    assert is_lost_rank_error(dist.DistBackendError("NCCL error"))
    assert not is_lost_rank_error(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not is_lost_rank_error(ValueError("Connection reset by peer"))
