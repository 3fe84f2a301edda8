"""Worker of `test_deepspeed.py` (run it with torchrun, 2 ranks, `DS_ACCELERATOR=cpu`).

Every run trains a tiny Llama SSMLoRA adapter for 3 steps under DeepSpeed (fp32, AdamW with `torch_adam`), each
rank on its half of the global batch; rank 0 also trains the same model as one plain process on the whole global
batch with torch's AdamW (the reference). The runs:
- engine runs (`deepspeed.initialize`): ZeRO-2 and ZeRO-3, `state_grad` "detach" and "full", with and without
  reentrant activation checkpointing, the default placement (q/v staggered: two chains) and four chains along every
  layer (q, k, v, o);
- `transformers.Trainer` with a DeepSpeed config dict (its "auto" values), ZeRO-2, and ZeRO-3 with reentrant
  gradient checkpointing as ZeRO-3 users set it up;
- reentrant checkpointing with `state_grad="full"`, which must be refused (the error is recorded).
ZeRO-3 partitions every parameter here (`stage3_param_persistence_threshold: 0`; by default DeepSpeed keeps
parameters under 100k elements, i.e. all of this model, whole on every rank, and would test nothing).
Trained ZeRO-3 adapters are saved the ways users save them: peft's `save_pretrained` with the engine's consolidated
16-bit state dict, `save_pretrained` inside `deepspeed.zero.GatheredParameters`, and `Trainer.save_model`.

Rank 0 writes everything to the path given as the first argument (see `main`); saved adapters go beside it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from peft import get_peft_model
from tiny_models import VOCAB, tiny_llama
from torch.utils.data import Dataset, SequentialSampler
from transformers import Trainer, TrainingArguments

from peft_ssmlora import SSMLoRAConfig

STEPS, GLOBAL_BATCH, LENGTH, LR = 3, 4, 8, 1e-2
PLACEMENTS = {
    "qv-staggered": {},  # the default: q_proj in even layers, v_proj in odd layers (two chains)
    "qkvo-every-layer": {"target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},  # four chains of 4 layers
}
# name: (ZeRO stage, state_grad, reentrant checkpointing, placement)
ENGINE_RUNS = {
    "zero2-detach": (2, "detach", False, "qv-staggered"),
    "zero2-full": (2, "full", False, "qv-staggered"),
    "zero2-detach-reentrant": (2, "detach", True, "qv-staggered"),
    "zero3-detach": (3, "detach", False, "qv-staggered"),
    "zero3-full": (3, "full", False, "qv-staggered"),
    "zero3-detach-reentrant": (3, "detach", True, "qv-staggered"),
    "zero3-full-qkvo": (3, "full", False, "qkvo-every-layer"),
    "zero3-detach-reentrant-qkvo": (3, "detach", True, "qkvo-every-layer"),
}
TRAINER_RUNS = {
    "trainer-zero2": (2, "detach", False, "qv-staggered"),
    "trainer-zero3-reentrant": (3, "detach", True, "qv-staggered"),
}
# reentrant checkpointing would cut the gradient along the chain: refused
REFUSED_RUNS = {
    "zero2-full-reentrant": (2, "full", True, "qv-staggered"),
    "zero3-full-reentrant": (3, "full", True, "qv-staggered"),
}
PROBE = torch.randint(1, VOCAB, (2, LENGTH), generator=torch.Generator().manual_seed(1))


def ssmlora_config(state_grad: str, placement: str) -> SSMLoRAConfig:
    return SSMLoRAConfig(r=4, state_dropout=0.0, init_weights=False, state_grad=state_grad, **PLACEMENTS[placement])


def new_model(state_grad: str, placement: str, reentrant: bool = False) -> torch.nn.Module:
    model = get_peft_model(tiny_llama(), ssmlora_config(state_grad, placement))
    if reentrant:
        model.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        model.enable_input_require_grads()  # reentrant checkpointing needs inputs that require grad
    return model.train()


def global_batches() -> torch.Tensor:
    return torch.randint(1, VOCAB, (STEPS, GLOBAL_BATCH, LENGTH), generator=torch.Generator().manual_seed(0))


# The engine runs' AdamW; the Trainer runs use Trainer's defaults (no weight decay, linear decay of the learning
# rate to 0, gradient clipping at norm 1), which the DeepSpeed config's "auto" values take over.
ADAMW = {"lr": LR, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01}
TRAINER_ADAMW = {**ADAMW, "weight_decay": 0.0}


def zero_config(stage: int) -> dict:
    if stage == 2:
        return {"stage": 2}
    return {"stage": 3, "stage3_param_persistence_threshold": 0, "stage3_model_persistence_threshold": 0,
            "stage3_gather_16bit_weights_on_model_save": True}


def train_one_process(state_grad: str, placement: str, trainer_schedule: bool):
    """Losses, adapter weights and probe logits of one plain process on the whole global batch."""
    model = new_model(state_grad, placement)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, **(TRAINER_ADAMW if trainer_schedule else ADAMW))
    linear_decay = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / STEPS if trainer_schedule else 1)
    losses = []
    for batch in global_batches():
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        if trainer_schedule:
            torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        linear_decay.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses, adapter_weights(model), probe_logits(model)


def train_engine(stage: int, state_grad: str, reentrant: bool, placement: str, rank: int, world: int):
    """Mean global-batch loss per step and the engine (every row has the same number of tokens)."""
    model = new_model(state_grad, placement, reentrant)
    config = {"train_batch_size": GLOBAL_BATCH, "train_micro_batch_size_per_gpu": GLOBAL_BATCH // world,
              "gradient_accumulation_steps": 1, "zero_optimization": zero_config(stage),
              "optimizer": {"type": "AdamW", "params": {**ADAMW, "torch_adam": True}}, "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
                                      config=config)
    rows = GLOBAL_BATCH // world
    losses = []
    for batch in global_batches():
        mine = batch[rank * rows:(rank + 1) * rows]
        loss = engine(input_ids=mine, labels=mine).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.detach())
    mean = torch.stack(losses)
    dist.all_reduce(mean)
    return (mean / world).tolist(), engine


class GlobalBatchRows(Dataset):
    """The global batches' rows in order: with `SequentialSampler`, step k of a 2-rank run sees global batch k."""

    def __init__(self):
        self.rows = global_batches().reshape(-1, LENGTH)

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return {"input_ids": self.rows[i], "labels": self.rows[i]}


class SequentialTrainer(Trainer):
    def _get_train_sampler(self, train_dataset=None):
        return SequentialSampler(train_dataset or self.train_dataset)


def train_trainer(stage: int, state_grad: str, reentrant: bool, placement: str, out_dir: Path, world: int):
    """Trainer's logged loss per step (its mean over the ranks) and the trainer."""
    config = {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
              "gradient_accumulation_steps": "auto", "gradient_clipping": "auto", "zero_optimization": zero_config(stage),
              "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                                        "weight_decay": "auto", "torch_adam": True}}}
    checkpointing = {"gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"use_reentrant": True}}
    args = TrainingArguments(
        str(out_dir), deepspeed=config, per_device_train_batch_size=GLOBAL_BATCH // world, max_steps=STEPS,
        learning_rate=LR, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, ddp_backend="gloo",
        disable_tqdm=True,
        # otherwise transformers logs each rank's loss multiplied by the world size (see test_ssmlora_training.py)
        average_tokens_across_devices=False, **(checkpointing if reentrant else {}))
    trainer = SequentialTrainer(model=new_model(state_grad, placement), args=args, train_dataset=GlobalBatchRows())
    trainer.train()
    assert trainer.model.base_model.model.is_gradient_checkpointing == reentrant
    return [h["loss"] for h in trainer.state.log_history if "loss" in h], trainer


def adapter_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The full SSMLoRA weights (ZeRO-3 keeps only a shard of each on a rank; gathering is collective)."""
    params = {name: p for name, p in model.named_parameters() if "ssmlora_" in name}
    with deepspeed.zero.GatheredParameters(list(params.values())):  # a no-op for parameters ZeRO does not partition
        return {name: p.detach().clone() for name, p in params.items()}


def partitioned(model: torch.nn.Module) -> bool:
    """Whether ZeRO-3 holds every SSMLoRA weight as shards, none of it whole on this rank."""
    params = [p for name, p in model.named_parameters() if "ssmlora_" in name]
    return all(hasattr(p, "ds_tensor") and p.numel() == 0 and p.ds_tensor.numel() < p.ds_numel for p in params)


def probe_logits(model) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=PROBE).logits


def save_zero3_adapter(engine, out_dir: Path, rank: int) -> None:
    """The two ways to save a ZeRO-3 trained adapter from the engine (both collective, on every rank)."""
    model = engine.module
    # what Trainer.save_model does: the engine consolidates the full 16-bit state dict on rank 0
    state_dict = engine._zero3_consolidated_16bit_state_dict()
    if rank == 0:
        model.save_pretrained(out_dir / "consolidated", state_dict=state_dict)
    with deepspeed.zero.GatheredParameters([p for name, p in model.named_parameters() if "ssmlora_" in name]):
        if rank == 0:
            model.save_pretrained(out_dir / "gathered")


def main(out_path: str) -> None:
    """Writes {"probe": input ids, "one-process": {(state_grad, placement, trainer schedule): (losses, weights, probe
    logits)}, "initial": {the same keys: adapter weights before training},
    "reference": {run: its one-process key}, "runs": {run: (losses, weights, probe logits)}, "refused": {run: error message}, "saved": {run: {way: dir}},
    "partitioned": {run: whether ZeRO-3 sharded the adapter weights}}."""
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    out = Path(out_path)
    results = {"probe": PROBE, "initial": {}, "one-process": {}, "reference": {}, "runs": {}, "refused": {}, "saved": {}, "partitioned": {}}

    def reference(run: str, state_grad: str, placement: str, trainer_schedule: bool) -> None:
        key = results["reference"][run] = (state_grad, placement, trainer_schedule)
        if rank == 0 and key not in results["one-process"]:
            results["initial"][key] = adapter_weights(new_model(state_grad, placement))
            results["one-process"][key] = train_one_process(*key)

    for name, (stage, state_grad, reentrant, placement) in ENGINE_RUNS.items():
        reference(name, state_grad, placement, trainer_schedule=False)
        losses, engine = train_engine(stage, state_grad, reentrant, placement, rank, world)
        if stage == 3:
            results["partitioned"][name] = partitioned(engine.module)
        results["runs"][name] = (losses, adapter_weights(engine.module), probe_logits(engine))
        if name == "zero3-detach":
            save_zero3_adapter(engine, out.parent / name, rank)
            results["saved"][name] = {way: str(out.parent / name / way) for way in ("consolidated", "gathered")}
    for name, (stage, state_grad, reentrant, placement) in TRAINER_RUNS.items():
        reference(name, state_grad, placement, trainer_schedule=True)
        losses, trainer = train_trainer(stage, state_grad, reentrant, placement, out.parent / name, world)
        if stage == 3:
            results["partitioned"][name] = partitioned(trainer.model)
            trainer.save_model(out.parent / name / "save_model")
            results["saved"][name] = {"save_model": str(out.parent / name / "save_model")}
        results["runs"][name] = (losses, adapter_weights(trainer.model), probe_logits(trainer.model_wrapped))
    # Last: a refused ZeRO-3 forward leaves its engine's parameters half gathered.
    for name, (stage, state_grad, reentrant, placement) in REFUSED_RUNS.items():
        try:
            train_engine(stage, state_grad, reentrant, placement, rank, world)
        except RuntimeError as error:  # raised on both ranks in the same forward, so no collective is left waiting
            results["refused"][name] = str(error)
    if rank == 0:
        torch.save(results, out)
    dist.barrier()  # a clean shutdown: gloo aborts when one rank exits while another still works
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
