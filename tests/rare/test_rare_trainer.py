"""End to end: the standard Trainer fed raw records through RAREDataCollator (BM25 retrieval + RAFT)."""

from __future__ import annotations

import pytest
import torch
from rare_fixtures import TOY_CORPUS, make_tokenizer, toy_examples
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from rare_data import BM25Retriever, RAREDataCollator, RAREEpochCallback


def _tiny_llama(vocab_size: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    return LlamaForCausalLM(config)


def _train(tmp_path, padding_free: bool) -> tuple[list[float], RAREDataCollator]:
    datasets = pytest.importorskip("datasets")
    tokenizer = make_tokenizer()
    retriever = BM25Retriever.from_texts(list(TOY_CORPUS.values()), ids=list(TOY_CORPUS))
    collator = RAREDataCollator(tokenizer, retriever=retriever, k=2, max_length=256, num_distractors=1,
                                p_keep_gold=0.8, shuffle_passages=True, padding_free=padding_free)
    # extra columns (id, gold_passage_ids) reach the collator because remove_unused_columns=False
    train = datasets.Dataset.from_list(toy_examples())
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, num_train_epochs=4,
                             learning_rate=1e-2, lr_scheduler_type="constant", logging_steps=1, report_to=[],
                             save_strategy="no", remove_unused_columns=False, use_cpu=True,
                             dataloader_num_workers=0, seed=0)
    trainer = Trainer(model=_tiny_llama(len(tokenizer)), args=args, train_dataset=train, data_collator=collator,
                      callbacks=[RAREEpochCallback(collator)])
    trainer.train()
    return [log["loss"] for log in trainer.state.log_history if "loss" in log], collator


def test_trainer_runs_and_loss_decreases_padded_and_padding_free(tmp_path):
    losses, collator = _train(tmp_path / "padded", padding_free=False)
    assert len(losses) == 8 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses
    assert collator.epoch == 3  # the callback advanced the RAFT epoch
    # Packed rows with position_ids must give the model the same per-example attention as padded rows: the
    # same data in the same order gives the same losses.
    flat_losses, _ = _train(tmp_path / "flat", padding_free=True)
    assert flat_losses == pytest.approx(losses, rel=1e-4)
