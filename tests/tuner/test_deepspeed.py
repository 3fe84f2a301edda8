"""DeepSpeed ZeRO-2 and ZeRO-3 on the CPU accelerator: two gloo ranks give one process's losses and adapter weights
at the same global batch, through the engine and through `transformers.Trainer`; adapters saved from ZeRO-3 load
into a plain `PeftModel` with the trained model's outputs. All runs share one torchrun launch
(`tests/tuner/deepspeed_worker.py`): starting the ranks and importing deepspeed is most of the cost."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from tiny_models import tiny_llama

from peft_ssmlora.chain import REENTRANT_CHECKPOINTING_REFUSED

# Found, not imported: the runs import it in their own processes.
pytestmark = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                reason="DeepSpeed is in the `dev` extra (alone: `pip install -e '.[deepspeed]'`)")

TESTS = Path(__file__).parent


@pytest.fixture(scope="module")
def deepspeed_results(tmp_path_factory):
    # Imported here, not at the top: it needs `datasets`, which the GPU machine may lack.
    from test_ssmlora_training import free_port

    out = tmp_path_factory.mktemp("deepspeed") / "results.pt"
    # PYTHONPATH: the worker imports tiny_models from the tests folder. DS_ACCELERATOR: without it DeepSpeed picks
    # the CPU accelerator only when it finds no GPU, and the worker must not run on a GPU machine's CUDA.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "DS_ACCELERATOR": "cpu",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS.parent), os.environ.get("PYTHONPATH")]))}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          str(free_port()), str(TESTS / "deepspeed_worker.py"), str(out)],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-5000:]
    return torch.load(out)


TRAINED_RUNS = ["zero2-detach", "zero2-full", "zero2-detach-reentrant", "zero3-detach", "zero3-full",
                "zero3-detach-reentrant", "zero3-full-qkvo", "zero3-detach-reentrant-qkvo",
                "trainer-zero2", "trainer-zero3-reentrant"]


@pytest.mark.parametrize("run", TRAINED_RUNS)
def test_two_ranks_match_one_process_at_the_same_global_batch(deepspeed_results, run):
    """ZeRO-2 / ZeRO-3, state_grad detach / full, reentrant checkpointing or none, 2 or 4 chains, engine or Trainer:
    the mean loss of every step, the gathered adapter weights and the trained model's outputs equal one process's."""
    losses, weights, probe = deepspeed_results["runs"][run]
    reference_losses, reference_weights, reference_probe = deepspeed_results["one-process"][
        deepspeed_results["reference"][run]]
    assert len(losses) == 3 and losses[-1] != losses[0]  # it trained
    assert losses == pytest.approx(reference_losses, rel=1e-5), run
    assert weights.keys() == reference_weights.keys() and any("ssmlora_C" in k for k in weights)
    initial = deepspeed_results["initial"][deepspeed_results["reference"][run]]
    # every B moved (the first C of a chain may not: it multiplies the chain's zero initial state)
    assert not any(torch.equal(weights[k], w) for k, w in initial.items() if "ssmlora_B" in k)
    for key in weights:
        torch.testing.assert_close(weights[key], reference_weights[key], rtol=1e-4, atol=1e-6, msg=f"{run} {key}")
    torch.testing.assert_close(probe, reference_probe, rtol=1e-4, atol=1e-5)
    if "zero3" in run:  # ZeRO-3 really sharded the adapter (tiny parameters stay whole by default)
        assert deepspeed_results["partitioned"][run]


def test_reentrant_checkpointing_with_full_state_grad_is_refused(deepspeed_results):
    """ZeRO-3 users get reentrant checkpointing; with state_grad="full" it would cut the gradient along the chain."""
    assert deepspeed_results["refused"] == {"zero2-full-reentrant": REENTRANT_CHECKPOINTING_REFUSED,
                                            "zero3-full-reentrant": REENTRANT_CHECKPOINTING_REFUSED}


@pytest.mark.parametrize(("run", "way"), [("zero3-detach", "consolidated"), ("zero3-detach", "gathered"),
                                          ("trainer-zero3-reentrant", "save_model")])
def test_adapter_saved_from_zero3_loads_into_a_plain_peft_model(deepspeed_results, run, way):
    """The engine's consolidated 16-bit state dict given to `save_pretrained`, `save_pretrained` inside
    `zero.GatheredParameters`, and `Trainer.save_model`: the saved adapter holds the trained weights and gives the
    trained model's outputs."""
    _, weights, probe = deepspeed_results["runs"][run]
    loaded = PeftModel.from_pretrained(tiny_llama(), deepspeed_results["saved"][run][way]).eval()
    loaded_weights = {n: p for n, p in loaded.named_parameters() if "ssmlora_" in n}
    assert loaded_weights.keys() == weights.keys()
    for name, weight in weights.items():
        torch.testing.assert_close(loaded_weights[name], weight, rtol=0, atol=0, msg=name)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=deepspeed_results["probe"]).logits, probe, rtol=0, atol=0)
