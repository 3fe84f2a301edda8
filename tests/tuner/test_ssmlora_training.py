"""SSMLoRA in training and generation: Trainer with resume, KV-cache generation, dtypes, activation checkpointing,
and multi-process (DDP) training."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from peft import get_peft_model
from tiny_models import VOCAB, tiny_bert, tiny_gpt2, tiny_llama
from torch.utils.data import SequentialSampler
from transformers import Trainer, TrainingArguments

from peft_ssmlora import SSMLoRAConfig
from peft_ssmlora.chain import ForwardCall

TESTS = Path(__file__).parent


def classification_data(n=24, length=10, seed=0) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, length), generator=g)
    labels = (ids[:, 0] > VOCAB // 2).long()  # learnable from the first token
    return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist(),
                              "labels": labels.tolist()})


class SequentialTrainer(Trainer):
    """Fixed data order, so that one process and two DDP ranks see the same global batches."""

    def _get_train_sampler(self, train_dataset=None):
        return SequentialSampler(train_dataset or self.train_dataset)


def training_args(output_dir, **overrides) -> TrainingArguments:
    args = dict(output_dir=str(output_dir), per_device_train_batch_size=4, num_train_epochs=2, learning_rate=5e-3,
                logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=3, disable_tqdm=True,
                max_grad_norm=1.0)
    args.update(overrides)
    return TrainingArguments(**args)


def step_losses(trainer) -> dict[int, float]:
    return {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}


def test_trainer_trains_evaluates_and_resumes_with_identical_losses(tmp_path):
    data = classification_data()
    config = dict(r=4, task_type="SEQ_CLS", state_dropout=0.1)

    torch.manual_seed(0)
    straight = Trainer(model=get_peft_model(tiny_bert(), SSMLoRAConfig(**config)),
                       args=training_args(tmp_path / "a"), train_dataset=data, eval_dataset=data)
    straight.train()
    expected = step_losses(straight)
    assert len(expected) == 12 and all(torch.isfinite(torch.tensor(list(expected.values()))))
    assert expected[12] < expected[1]
    assert "eval_loss" in straight.evaluate()

    # The same run, checkpointing every 5 steps; then resume from step 5 with a new model and trainer.
    checkpointed = training_args(tmp_path / "b", save_strategy="steps", save_steps=5)
    torch.manual_seed(0)
    Trainer(model=get_peft_model(tiny_bert(), SSMLoRAConfig(**config)), args=checkpointed, train_dataset=data).train()
    torch.manual_seed(123)
    resumed = Trainer(model=get_peft_model(tiny_bert(), SSMLoRAConfig(**config)), args=checkpointed,
                      train_dataset=data)
    resumed.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-5"))
    got = {step: loss for step, loss in step_losses(resumed).items() if step > 5}
    assert sorted(got) == list(range(6, 13))
    for step, loss in got.items():
        assert loss == pytest.approx(expected[step], rel=1e-5), step


@pytest.mark.parametrize("make_model", [tiny_gpt2, tiny_llama], ids=["gpt2", "llama"])
def test_generate_with_kv_cache_matches_no_cache(make_model):
    model = get_peft_model(make_model(), SSMLoRAConfig(r=4, init_weights=False))
    model.eval()
    prompt = torch.randint(1, VOCAB, (2, 5), generator=torch.Generator().manual_seed(1))
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with_cache = model.generate(input_ids=prompt, use_cache=True, **kwargs)
    without_cache = model.generate(input_ids=prompt, use_cache=False, **kwargs)
    assert torch.equal(with_cache, without_cache)
    with model.disable_adapter():
        base = model.generate(input_ids=prompt, use_cache=True, **kwargs)
    assert not torch.equal(with_cache, base)  # the adapter really takes part in generation


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_half_precision_base_models(dtype, monkeypatch):
    reference = get_peft_model(tiny_llama(), SSMLoRAConfig(r=4, init_weights=False))
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama().to(dtype), SSMLoRAConfig(r=4, init_weights=False))
    model.load_state_dict(reference.state_dict(), strict=False)
    ids = torch.randint(1, VOCAB, (2, 6), generator=torch.Generator().manual_seed(2))
    states = []
    write = ForwardCall.write
    monkeypatch.setattr(ForwardCall, "write", lambda call, *args: (states.append(args[-1]), write(call, *args)))
    model.train()
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    assert out.logits.dtype == dtype
    assert states and all(s.dtype == torch.float32 for s in states)
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    reference.train()
    with torch.no_grad():
        model.eval(), reference.eval()
        tolerance = {torch.float32: 1e-5, torch.bfloat16: 0.1, torch.float16: 0.02}[dtype]
        torch.testing.assert_close(model(input_ids=ids).logits.float(), reference(input_ids=ids).logits,
                                   rtol=tolerance, atol=tolerance)


def gradients(model, ids) -> dict[str, torch.Tensor]:
    model.zero_grad()
    torch.manual_seed(11)  # same state-dropout masks in both runs
    model(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("state_grad", ["detach", "full"])
def test_non_reentrant_checkpointing_gives_the_same_gradients(state_grad):
    model = get_peft_model(tiny_llama(), SSMLoRAConfig(r=4, init_weights=False, state_grad=state_grad,
                                                      target_modules=["q_proj", "v_proj", "down_proj"]))
    model.train()
    ids = torch.randint(1, VOCAB, (2, 6), generator=torch.Generator().manual_seed(3))
    plain = gradients(model, ids)
    model.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert model.base_model.model.is_gradient_checkpointing
    checkpointed = gradients(model, ids)
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)


def test_reentrant_checkpointing_is_refused_with_full_state_gradients():
    """With detached states it is exact (tests/tuner/test_ssmlora_reliability.py)."""
    model = get_peft_model(tiny_llama(), SSMLoRAConfig(r=4, state_grad="full"))
    model.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.train()
    ids = torch.randint(1, VOCAB, (2, 6))
    with pytest.raises(RuntimeError, match="reentrant activation checkpointing.*use_reentrant': False"):
        model(input_ids=ids, labels=ids)
    model.eval()  # evaluation does not checkpoint, so it stays allowed
    with torch.no_grad():
        model(input_ids=ids)


def test_training_stays_finite_right_after_the_first_updates(tmp_path):
    """At initialisation every state entry is equal (hi == lo), where the normalisation's gradient is ~1/eps: with
    gradient clipping and float32 states, training must stay finite."""
    data = classification_data(n=32)
    trainer = Trainer(model=get_peft_model(tiny_bert(), SSMLoRAConfig(r=8, task_type="SEQ_CLS")),
                      args=training_args(tmp_path, num_train_epochs=1, learning_rate=5e-4), train_dataset=data)
    trainer.train()
    losses = step_losses(trainer)
    assert all(torch.isfinite(torch.tensor(list(losses.values()))))
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


DDP_SCRIPT = r"""
import json, os
import torch
from peft import get_peft_model
from test_ssmlora_training import SequentialTrainer, classification_data, step_losses, training_args
from tiny_models import tiny_bert
from peft_ssmlora import SSMLoRAConfig
world = int(os.environ.get("WORLD_SIZE", "1"))
model = get_peft_model(tiny_bert(), SSMLoRAConfig(r=4, task_type="SEQ_CLS", state_dropout=0.0, init_weights=False))
distributed = dict(ddp_backend="gloo", ddp_find_unused_parameters=False) if world > 1 else {{}}
# average_tokens_across_devices=False: otherwise transformers logs each rank's loss multiplied by the world size
# (it rescales the loss for token averaging), which would hide the comparison of the curves.
args = training_args({out!r} + str(world), per_device_train_batch_size=4 // world,
                     average_tokens_across_devices=False, **distributed)
trainer = SequentialTrainer(model=model, args=args, train_dataset=classification_data())
trainer.train()
if int(os.environ.get("RANK", "0")) == 0:
    with open({out!r} + str(world) + ".json", "w") as f:
        json.dump(step_losses(trainer), f)
    trained = {{n: p.detach() for n, p in model.named_parameters() if p.requires_grad}}
    torch.save(trained, {out!r} + str(world) + ".pt")
if torch.distributed.is_initialized():  # a clean shutdown: gloo aborts when one rank exits while another still works
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_match_one_process_at_the_same_global_batch(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(DDP_SCRIPT.format(out=str(tmp_path / "run")))
    # PYTHONPATH: the script imports this module (tests/tuner) and tiny_models (tests)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), str(TESTS.parent), os.environ.get("PYTHONPATH")]))}
    single = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          str(free_port()), str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert ddp.returncode == 0, ddp.stderr
    one = json.loads((tmp_path / "run1.json").read_text())
    two = json.loads((tmp_path / "run2.json").read_text())
    assert len(one) == 12 and one.keys() == two.keys()
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-4, abs=1e-6), step
    weights_one, weights_two = torch.load(tmp_path / "run1.pt"), torch.load(tmp_path / "run2.pt")
    assert weights_one.keys() == weights_two.keys() and any("ssmlora_C" in n for n in weights_one)
    for name in weights_one:
        torch.testing.assert_close(weights_two[name], weights_one[name], rtol=1e-4, atol=1e-6, msg=name)
