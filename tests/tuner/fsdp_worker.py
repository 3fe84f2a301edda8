"""Worker of `test_ssmlora_stack.py::test_fsdp_two_processes_match_one_process` (run it with torchrun).

Every rank trains a tiny Llama SSMLoRA adapter for a few steps, once as one plain process on the whole global batch
(the reference) and once sharded over the process group, in each sharding setup that users meet:
- FSDP1 wrapped with peft's `fsdp_auto_wrap_policy`, which `Trainer` installs for every peft model (each trainable
  leaf its own FSDP unit), with `use_orig_params=True` (Trainer's default) and `False` (accelerate's default), on
  the PyTorch and the Triton step;
- FSDP2 `fully_shard` on each decoder layer, then the whole model.
Rank 0 writes every run's mean loss per step and final adapter weights to the path given as the first argument.

Trainer and accelerate cannot run this on CPU: accelerate only shards on GPU-like devices and otherwise falls back
to DDP. So the model is wrapped here with the same torch FSDP classes and the same peft wrap policy they use.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from peft import get_peft_model
from peft.utils.other import fsdp_auto_wrap_policy
from tiny_models import VOCAB, tiny_llama
from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard
from torch.distributed.tensor import DTensor

from peft_ssmlora import SSMLoRAConfig

STEPS, GLOBAL_BATCH, LENGTH = 4, 4, 8
# name: (wrapping, use_orig_params, step implementation)
RUNS = {
    "fsdp1-orig-params-torch": ("fsdp1", True, "torch"),
    "fsdp1-flat-params-torch": ("fsdp1", False, "torch"),
    "fsdp1-flat-params-triton": ("fsdp1", False, "triton"),
    "fsdp2-torch": ("fsdp2", None, "torch"),
}


def new_model() -> torch.nn.Module:
    return get_peft_model(tiny_llama(), SSMLoRAConfig(r=4, state_dropout=0.0, init_weights=False))


def shard(model: torch.nn.Module, wrapping: str, use_orig_params: bool | None) -> torch.nn.Module:
    if wrapping == "fsdp1":
        return FullyShardedDataParallel(model, auto_wrap_policy=fsdp_auto_wrap_policy(model),
                                        use_orig_params=use_orig_params, device_id=torch.device("cpu"))
    for layer in model.base_model.model.model.layers:
        fully_shard(layer)
    return fully_shard(model)


def train(model: torch.nn.Module, rank: int, world: int) -> list[float]:
    """Mean loss of the global batch at each step (every row has the same number of tokens)."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    data = torch.randint(1, VOCAB, (STEPS, GLOBAL_BATCH, LENGTH), generator=torch.Generator().manual_seed(0))
    rows = GLOBAL_BATCH // world
    model.train()
    losses = []
    for batch in data:
        mine = batch[rank * rows:(rank + 1) * rows]
        loss = model(input_ids=mine, labels=mine).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.detach())
    mean = torch.stack(losses)
    if world > 1:
        dist.all_reduce(mean)
        mean /= world
    return mean.tolist()


def adapter_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The full (unsharded) SSMLoRA weights, named as in the unwrapped model."""

    def collect():
        weights = {}
        for name, param in model.named_parameters():
            if "ssmlora_" in name:
                full = param.full_tensor() if isinstance(param, DTensor) else param
                weights[name.replace("_fsdp_wrapped_module.", "")] = full.detach().clone()
        return weights

    if isinstance(model, FullyShardedDataParallel):
        with FullyShardedDataParallel.summon_full_params(model):
            return collect()
    return collect()


def main(out_path: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {}
    for impl in sorted({impl for _, _, impl in RUNS.values()}):
        os.environ["PEFT_SSMLORA_IMPL"] = impl
        reference = new_model()
        results[f"one-process-{impl}"] = (train(reference, 0, 1), adapter_weights(reference))
    for name, (wrapping, use_orig_params, impl) in RUNS.items():
        os.environ["PEFT_SSMLORA_IMPL"] = impl
        model = shard(new_model(), wrapping, use_orig_params)
        results[name] = (train(model, rank, world), adapter_weights(model))
    if rank == 0:
        torch.save(results, out_path)
    dist.barrier()  # a clean shutdown: gloo aborts when one rank exits while another still works
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
