"""The training loop: megatron's forward/backward schedule, optimizer step, (u, t) refresh, eval,
metrics and checkpoints."""

import itertools
import os
from dataclasses import replace
from functools import partial
from typing import Iterator, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from .. import megatron_compat
from ..config import ConfigError, RunConfig, architecture_differences
from ..data.loader import build_datasets, dataset_sizes, iterate_batches, validation_batches
from ..data.prepare import ensure_prepared
from ..data.tokenizer import load_tokenizer
from ..model import build_model_chunks
from ..model.chunks import ModelChunks
from ..kernels.choice import check_kernel_choice, uses_triton
from ..model.capabilities import Capabilities
from ..model.stats import model_stats
from .checkpoint import (Checkpointer, TrainState, load_model_weights, read_run_config,
                         resolve_checkpoint)
from .metrics import MetricsLogger, Throughput, device_name, peak_flops_per_second
from .optim import build_optimizer, is_value_group
from .preemption import StopRequest, signals_deferred


def training_dtype(run: RunConfig) -> torch.dtype:
    """bf16 on GPU and fp32 on CPU unless the config says otherwise."""
    precision = run.train.precision
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return torch.bfloat16 if precision == "bf16" else torch.float32


def machine_capabilities(run: RunConfig) -> Capabilities:
    """What this machine offers, narrowed by train.transformer_impl; asking for Transformer
    Engine where it does not import is a config error."""
    caps = Capabilities.detect()
    impl = run.train.transformer_impl
    if impl == "transformer_engine" and not caps.transformer_engine:
        raise ConfigError("train.transformer_impl=transformer_engine, but Transformer Engine "
                          "does not import here (auto or local use megatron's local layers)")
    kernel = getattr(run.model.memory, "kernel", None)
    if kernel is not None:   # model.<family>.kernel=triton where it cannot run
        try:
            check_kernel_choice(kernel, "cuda" if caps.cuda else "cpu")
        except ValueError as err:
            raise ConfigError(str(err)) from None
    caps = replace(caps, transformer_engine=False) if impl == "local" else caps
    if run.parallel.context_parallel_size > 1 and not caps.transformer_engine:
        raise ConfigError("parallel.context_parallel_size > 1 needs Transformer Engine's "
                          "attention (megatron's local attention runs one context rank only); "
                          + ("train.transformer_impl=local" if impl == "local" else
                             "Transformer Engine does not import here"))
    return caps


def memory_kernels(run: RunConfig, caps: Capabilities) -> str:
    """', Triton memory kernels' or ', torch memory ops' for a model whose memory has a kernel
    choice (UltraMem, UltraMemV2, Memory+), else ''."""
    kernel = getattr(run.model.memory, "kernel", None)
    if kernel is None:
        return ""
    triton = uses_triton(kernel, "cuda" if caps.cuda else "cpu")
    return ", Triton memory kernels" if triton else ", torch memory ops"


def _loss_func(loss_mask: torch.Tensor, output: torch.Tensor):
    """output: per-token losses [b, s] -> (masked mean, values to log); on the last pipeline
    stage only. The memory aux losses are not added: their gradients join the backward inside
    the model (AuxLossGradient, scaled by MemoryGPT.set_aux_loss_scale), on whatever stage or
    recompute runs their blocks, and their values are collected from the model chunks."""
    lm_loss = (output.float() * loss_mask).sum() / loss_mask.sum().clamp(min=1)
    # Clone: megatron's schedule divides the returned loss by the number of micro-batches in place.
    return lm_loss, {"lm_loss": lm_loss.detach().clone()}


def _forward_step(data_iterator, ddp_chunk):
    """One micro-batch through one model chunk: the first stage reads the tokens, the last the
    labels (every stage reads the whole batch; middle stages take their input from the
    previous stage)."""
    batch = {k: v.to(megatron_compat.device()) for k, v in next(data_iterator).items()}
    batch = megatron_compat.context_parallel_part(batch)   # the batch itself without CP
    output = ddp_chunk(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    return output, partial(_loss_func, batch["loss_mask"])


def _mean_lm_loss(reduced: list[dict]) -> float:
    """The micro-batches' mean LM loss, computed on the last pipeline stage, on every rank."""
    local = sum(r["lm_loss"].item() for r in reduced) / len(reduced) if reduced else 0.0
    return megatron_compat.from_last_stage([local], megatron_compat.device())[0]


def _mean_over_data_parallel(values: list[float]) -> list[float]:
    """Means over the data-parallel and context-parallel ranks (each CP rank's loss is over its
    part of the sequences; the parts are equal)."""
    tensor = torch.tensor(values, dtype=torch.float64, device=megatron_compat.device())
    if dist.is_initialized():
        dist.all_reduce(tensor, group=parallel_state.get_data_parallel_group(
            with_context_parallel=True))
        tensor /= parallel_state.get_data_parallel_world_size(with_context_parallel=True)
    return tensor.tolist()


def _check_init_from(run: RunConfig):
    """train.init_from's checkpoint directory, refused before any work when its model differs."""
    path = resolve_checkpoint(run.train.init_from)
    differences = architecture_differences(run.model, read_run_config(path).model)
    if differences:
        raise ConfigError(f"train.init_from={run.train.init_from}: the weights were trained with "
                          f"another model (this run vs the checkpoint): {'; '.join(differences)}")
    return path


class Trainer:
    """Builds data, model, optimizer and checkpointer for a RunConfig; run() trains."""

    def __init__(self, run: RunConfig):
        self.cfg = run
        train = run.train
        if train.threads:
            torch.set_num_threads(train.threads)
        world_error = run.parallel.world_size_error(int(os.environ.get("WORLD_SIZE", "1")))
        if world_error:
            raise ConfigError(world_error)
        init_from = _check_init_from(run) if train.init_from else None
        self.capabilities = machine_capabilities(run)
        parallel = run.parallel
        megatron_compat.initialize_distributed(
            parallel.tensor_model_parallel_size, train.seed, parallel.memory_parallel_size,
            train.collective_timeout_s, parallel.pipeline_model_parallel_size,
            parallel.virtual_pipeline_model_parallel_size, parallel.context_parallel_size,
            parallel.expert_model_parallel_size)
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp_size = parallel_state.get_data_parallel_world_size()
        if train.global_batch_size % (train.micro_batch_size * self.dp_size):
            raise ConfigError(f"train.global_batch_size ({train.global_batch_size}) must be a "
                              f"multiple of micro_batch_size x data-parallel size "
                              f"({train.micro_batch_size} x {self.dp_size})")
        self.num_microbatches = train.global_batch_size // (train.micro_batch_size * self.dp_size)
        self.is_logger = dist.get_rank() == 0

        tokenizer = load_tokenizer(run.data.tokenizer)
        if tokenizer.vocab_size > run.model.vocab_size:
            raise ConfigError(f"model.vocab_size ({run.model.vocab_size}) is smaller than the "
                              f"tokenizer's vocabulary ({tokenizer.vocab_size})")
        # A world of one tokenizes what is missing; a larger one only checks, on every rank (no
        # rank waits on another's tokenizing): train.py and launch/submit.py refuse it earlier.
        ensure_prepared(run.data, tokenizer, build=dist.get_world_size() == 1)
        train_samples, valid_samples = dataset_sizes(train)
        self.train_data, self.valid_data = build_datasets(
            run.data, tokenizer, seq_length=run.model.seq_length, seed=train.seed,
            train_samples=train_samples, valid_samples=valid_samples,
            valid_seed=run.data.valid_seed)

        self.dtype = training_dtype(run)
        self.model = ModelChunks(build_model_chunks(run.model, run.parallel, self.dtype,
                                                    self.capabilities, init_seed=train.seed))
        if self.is_logger:
            print(f"{run.model.family} model, {str(self.dtype).removeprefix('torch.')}, "
                  f"{'Transformer Engine' if self.capabilities.transformer_engine else 'local'} "
                  f"layers{memory_kernels(run, self.capabilities)}; "
                  f"{self.capabilities.describe()}", flush=True)
        self.ddp_chunks = megatron_compat.wrap_model_chunks(
            list(self.model), run.parallel.use_distributed_optimizer,
            overlap_grad_reduce=run.parallel.overlap_grad_reduce,
            overlap_param_gather=run.parallel.overlap_param_gather)
        self.optimizer, self.scheduler = build_optimizer(run, self.ddp_chunks, self.dtype)
        self.checkpointer = Checkpointer(train.run_dir, train.keep_last, run, train.async_save)
        self.state = TrainState()
        self.checkpointer.clean_incomplete()
        latest = self.checkpointer.latest() if train.resume else None
        if latest is not None:
            self.state = self.checkpointer.load(latest, self.model, self.optimizer, self.scheduler)
            if self.is_logger:
                print(f"resumed from {latest} at step {self.state.step}", flush=True)
        elif init_from is not None:
            load_model_weights(init_from, self.model)
            if self.is_logger:
                print(f"initialized the model from {init_from}", flush=True)
        self._defer_refresh_rank1()
        self.throughput = Throughput(  # the peak (and its unknown-device warning) on rank 0 only
            train.global_batch_size * run.model.seq_length,
            model_stats(run.model).mfu_flops_per_token,
            peak_flops_per_second(device_name(), train.peak_tflops) if self.is_logger else None,
            dist.get_world_size())

    # ------------------------------------------------------------- deferred parameter gather

    def _defer_refresh_rank1(self) -> None:
        """With parallel.overlap_param_gather the optimizer step leaves the updated parameters
        ungathered until the next forward's pre-hooks (megatron-LM's way), so the rank-1
        refresh, which reads the Tucker cores, cannot run right after the step: each memory
        layer's retrieval refreshes in a forward pre-hook instead, once its parameters'
        gather is done. As in megatron-LM's training loop the gather hooks stay off until the
        first step (every rank already holds the initial / loaded parameters)."""
        self._refresh_pending: set = set()
        if not self._overlaps_param_gather():
            return
        for chunk, ddp_chunk in zip(self.model, self.ddp_chunks):
            megatron_compat.set_param_gather_hooks(ddp_chunk, False)
            for layer in chunk.memory_layers():
                module = getattr(layer, "retrieval", layer)   # UltraMem: start()'s first module
                module.register_forward_pre_hook(
                    partial(self._refresh_before_forward, ddp_chunk, layer))

    def _overlaps_param_gather(self) -> bool:
        return megatron_compat.overlaps_param_gather(self.ddp_chunks[0])

    def _refresh_before_forward(self, ddp_chunk, layer, module, *unused) -> None:
        # The whole layer's gather, not only the retrieval's: megatron's pre-hooks fire on module
        # calls, and the value module is never called (UltraMemLayer.start uses its dispatch()),
        # so without this its table would stay stale wherever the optimizer shards it (counted:
        # scripts/bench_grad_traffic.py --count --overlap, P = 1).
        megatron_compat.wait_param_gather(ddp_chunk, layer)
        if layer in self._refresh_pending:
            layer.refresh_rank1()
            self._refresh_pending.discard(layer)

    def _after_optimizer_step(self) -> None:
        if self._overlaps_param_gather():
            for ddp_chunk in self.ddp_chunks:
                megatron_compat.set_param_gather_hooks(ddp_chunk, True)
            self._refresh_pending = set(self.model.memory_layers())
        else:
            self.model.refresh_rank1()

    def sync_params(self) -> None:
        """Every parameter current and every rank-1 filter refreshed: before anything outside a
        forward reads them (metrics, evaluation, checkpoints, the end of the run). A no-op
        without parallel.overlap_param_gather."""
        for ddp_chunk in self.ddp_chunks:
            megatron_compat.sync_params(ddp_chunk)
        for layer in self.model.memory_layers():
            if layer in self._refresh_pending:
                layer.refresh_rank1()
        self._refresh_pending = set()

    # -------------------------------------------------------------------------------- steps

    def _schedule(self, data: list[Iterator], num_microbatches: int,
                  forward_only: bool) -> list[dict]:
        """megatron's schedule for the layout (no pipelining, 1F1B, or interleaved 1F1B over
        this rank's model chunks); data: one iterator per chunk, over the same micro-batches."""
        self.model.set_aux_loss_scale(1.0 / num_microbatches)
        return get_forward_backward_func()(
            forward_step_func=_forward_step,
            data_iterator=data if len(data) > 1 else data[0], model=self.ddp_chunks,
            num_microbatches=num_microbatches,
            seq_length=self.cfg.model.seq_length, micro_batch_size=self.cfg.train.micro_batch_size,
            forward_only=forward_only)

    def train_step(self, data: list[Iterator]) -> dict:
        for ddp_chunk in self.ddp_chunks:
            ddp_chunk.train()
            ddp_chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        reduced = self._schedule(data, self.num_microbatches, forward_only=False)
        update_ok, grad_norm, _ = self.optimizer.step()
        if not update_ok:
            raise FloatingPointError(f"optimizer step {self.state.step + 1} was skipped: "
                                     "non-finite gradients")
        self.scheduler.step(increment=1)
        self._after_optimizer_step()   # refresh_rank1 now, or deferred to the gathered forward
        self.state.step += 1
        self.state.consumed_samples += self.cfg.train.global_batch_size
        lm, aux = _mean_over_data_parallel([
            _mean_lm_loss(reduced), self.model.take_aux_loss(self.num_microbatches)])
        return {"loss": lm, "aux_loss": aux, "grad_norm": float(grad_norm)}

    @torch.no_grad()
    def evaluate(self) -> Optional[float]:
        if self.valid_data is None:
            return None
        self.sync_params()
        for ddp_chunk in self.ddp_chunks:
            ddp_chunk.eval()
        batches = validation_batches(self.valid_data, self.cfg.train.micro_batch_size,
                                     self.cfg.train.eval_iters * self.num_microbatches,
                                     dp_rank=self.dp_rank, dp_size=self.dp_size)
        reduced = self._schedule([iter(batches) for _ in self.ddp_chunks], len(batches),
                                 forward_only=True)
        (loss,) = _mean_over_data_parallel([_mean_lm_loss(reduced)])
        return loss

    def _throughput_record(self) -> dict:
        """The window's throughput; max_memory_gib is the largest over all ranks."""
        record = self.throughput.record()
        if record["max_memory_gib"] is not None and dist.get_world_size() > 1:
            peak = torch.tensor([record["max_memory_gib"]], dtype=torch.float64,
                                device=megatron_compat.device())
            dist.all_reduce(peak, op=dist.ReduceOp.MAX)
            record["max_memory_gib"] = peak.item()
        return record

    def _usage_groups(self) -> list:
        """The ranks whose memory lookups differ: data-parallel, TP under sequence parallelism
        (each TP rank then retrieves for its own tokens), and context-parallel."""
        groups = [parallel_state.get_data_parallel_group()]
        if self.cfg.parallel.sequence_parallel:
            groups.append(parallel_state.get_tensor_model_parallel_group())
        if self.cfg.parallel.context_parallel_size > 1:
            groups.append(parallel_state.get_context_parallel_group())
        return groups

    def _learning_rates(self) -> tuple[float, Optional[float]]:
        base, value = None, None
        for group in self.optimizer.param_groups:
            if is_value_group(group):
                value = group["lr"]
            elif group.get("default_config", False) and base is None:
                base = group["lr"]
        return base, value

    # -------------------------------------------------------------------------------- loop

    def save(self) -> None:
        self.sync_params()
        with signals_deferred():
            self.checkpointer.save(self.model, self.optimizer, self.scheduler, self.state)
        self.saved_step = self.state.step

    def run(self, stop: Optional[StopRequest] = None) -> dict:
        """Train to train.max_steps (or exit_after_steps more). `stop` (installed signal
        handlers) ends the run at a step boundary, with a checkpoint, once any rank got a signal;
        the returned record then has "stopped_by"."""
        train = self.cfg.train
        stop = stop or StopRequest()
        # Each model chunk takes every micro-batch (interleaved: chunk by chunk), read once.
        data = list(itertools.tee(iterate_batches(
            self.train_data, train.micro_batch_size, self.state.consumed_samples,
            dp_rank=self.dp_rank, dp_size=self.dp_size), len(self.ddp_chunks)))
        logger = MetricsLogger(self.cfg, self.state.step) if self.is_logger else None
        last = {}
        self.throughput.restart()
        stop_at = train.max_steps
        if train.exit_after_steps:
            stop_at = min(stop_at, self.state.step + train.exit_after_steps)
        self.saved_step = self.state.step
        self.forwards_since_log = 0
        while self.state.step < stop_at:
            self.checkpointer.finish_pending(blocking=False)   # commit a save whose writes ended
            signal_name = stop.agreed(megatron_compat.device())
            if signal_name:
                if self.saved_step != self.state.step:
                    self.save()
                last = {**last, "step": self.state.step, "stopped_by": signal_name}
                break
            metrics = self.train_step(data)
            self.forwards_since_log += self.num_microbatches
            self.throughput.step()
            step = self.state.step
            if logger:
                logger.advance()
            if step % train.log_interval == 0 or step == train.max_steps:
                self.sync_params()   # memory_usage reads the keys and values
                lr, value_lr = self._learning_rates()
                record = {"step": step, **metrics, "lr": lr, "value_lr": value_lr,
                          **self._throughput_record(),
                          **self.model.memory_usage(self._usage_groups()),
                          **megatron_compat.moe_aux_losses(self.forwards_since_log)}
                self.forwards_since_log = 0
                if step % train.eval_interval == 0 or step == train.max_steps:
                    record["val_loss"] = self.evaluate()
                if logger:
                    logger.log(record)
                last = record
                self.throughput.restart()
            if step % train.save_interval == 0 or step == stop_at:
                self.save()
        self.sync_params()
        self.checkpointer.finish_pending()   # the last save is complete before the run ends
        if logger:
            logger.close()
        return last
