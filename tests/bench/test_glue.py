"""Tests of the GLUE runner `benchmarks/glue/runner.py`: reading GLUE's TSV formats, scoring, and a few training steps of
each task family (single sentence, sentence pair, regression, 3-class with two dev sets) on a tiny BERT built from a
config in a temporary folder, so nothing comes from the Hub."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import benchmarks.glue.runner as glue
import benchmarks.glue.tasks as glue_tasks
from benchmarks.harness import stats

WORDS = ["the", "a", "cat", "dog", "sat", "ran", "on", "mat", "fast", "slow", "is", "was", "good", "bad", "movie", "plot", "not", "very"]


# ---------------------------------------------------------------------------------------------------------------
# Fixtures: a tiny BERT and a tiny GLUE folder, both written to tmp
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    """A 4-layer BERT (hidden 32) with a word-level vocabulary: saved to disk, loadable by `from_pretrained`."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    folder = tmp_path_factory.mktemp("tiny_bert")
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS])}
    BertTokenizer(vocab=vocab).save_pretrained(folder)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                        intermediate_size=37, max_position_embeddings=64)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder)
    return folder


def _sentence(rng) -> str:
    return " ".join(rng.choice(WORDS, size=rng.integers(3, 9)))


def _write(path: Path, rows: list[list], header: list[str] | None, bom: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = (["\t".join(header)] if header else []) + ["\t".join(str(c) for c in r) for r in rows]
    path.write_text(("\ufeff" if bom else "") + "\n".join(lines) + "\n", encoding="utf-8")


@pytest.fixture(scope="module")
def glue_dir(tmp_path_factory) -> Path:
    """Tiny train/dev TSVs in GLUE's own folder names and column layouts (incl. CoLA without header, MRPC's BOM,
    a quote character in the text, and an MNLI row without a gold label)."""
    root = tmp_path_factory.mktemp("glue")
    rng = np.random.default_rng(0)
    for split, n in (("train", 24), ("dev", 10)):
        _write(root / "CoLA" / f"{split}.tsv",
               [["gj04", i % 2, "*" if i % 2 == 0 else "", _sentence(rng)] for i in range(n)], None)
        _write(root / "SST-2" / f"{split}.tsv", [[_sentence(rng) + ' "', i % 2] for i in range(n)],
               ["sentence", "label"])
        _write(root / "MRPC" / f"{split}.tsv", [[i % 2, 100 + i, 200 + i, _sentence(rng), _sentence(rng)]
                                                for i in range(n)],
               ["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"], bom=True)
        _write(root / "STS-B" / f"{split}.tsv",
               [[i, "main-news", "f", "2012", i, "none", "none", _sentence(rng), _sentence(rng), f"{(i * 0.37) % 5:.3f}"]
                for i in range(n)],
               ["index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2",
                "score"])
        _write(root / "RTE" / f"{split}.tsv",
               [[i, _sentence(rng), _sentence(rng), ["entailment", "not_entailment"][i % 2]] for i in range(n)],
               ["index", "sentence1", "sentence2", "label"])
    gold = ["entailment", "neutral", "contradiction"]
    mnli_header = ["index", "promptID", "pairID", "genre", "sentence1", "sentence2", "label1", "gold_label"]
    _write(root / "MNLI" / "train.tsv", [[i, i, i, "fiction", _sentence(rng), _sentence(rng), gold[i % 3],
                                          gold[i % 3]] for i in range(24)], mnli_header)
    for dev in ("dev_matched", "dev_mismatched"):
        rows = [[i, i, i, "fiction", _sentence(rng), _sentence(rng), gold[i % 3], gold[i % 3]] for i in range(9)]
        rows.append([9, 9, 9, "fiction", _sentence(rng), _sentence(rng), "neutral", "-"])  # no gold label
        _write(root / "MNLI" / f"{dev}.tsv", rows, mnli_header)
    return root


# ---------------------------------------------------------------------------------------------------------------
# Reading and scoring
# ---------------------------------------------------------------------------------------------------------------


def test_reads_every_glue_layout(glue_dir):
    cola = glue_tasks.read_tsv(glue_dir / "CoLA" / "train.tsv", glue_tasks.get_task("cola"))
    assert len(cola["label"]) == 24 and cola["label"][:2] == [0, 1] and cola["text_b"][0] is None
    sst2 = glue_tasks.read_tsv(glue_dir / "SST-2" / "dev.tsv", glue_tasks.get_task("sst2"))
    assert sst2["text_a"][0].endswith('"')  # a bare quote survives (QUOTE_NONE)
    mrpc = glue_tasks.read_tsv(glue_dir / "MRPC" / "train.tsv", glue_tasks.get_task("mrpc"))  # BOM before header
    assert len(mrpc["label"]) == 24 and mrpc["text_b"][0] is not None
    stsb = glue_tasks.read_tsv(glue_dir / "STS-B" / "train.tsv", glue_tasks.get_task("stsb"))
    assert stsb["label"][1] == pytest.approx(0.37)
    rte = glue_tasks.read_tsv(glue_dir / "RTE" / "train.tsv", glue_tasks.get_task("rte"))
    assert rte["label"][:2] == [0, 1]  # entailment = 0, as in the Hub's nyu-mll/glue
    mnli = glue_tasks.read_tsv(glue_dir / "MNLI" / "dev_matched.tsv", glue_tasks.get_task("mnli"))
    assert mnli["label"] == [0, 1, 2] * 3  # the row with gold label "-" is dropped


def test_metrics_match_known_values():
    from benchmarks.glue.tasks import compute_metrics, get_task, task_score

    labels = np.array([1, 1, 0, 0, 1])
    logits = np.array([[0, 1], [1, 0], [1, 0], [0, 1], [0, 1]], dtype=float)  # preds 1 0 0 1 1: 3 of 5 right
    m = compute_metrics(get_task("mrpc"), logits, labels)
    assert m["accuracy"] == pytest.approx(60.0) and m["f1"] == pytest.approx(100 * 2 / 3)  # P = R = 2/3
    assert task_score(get_task("mrpc"), m) == pytest.approx((60.0 + 200 / 3) / 2)
    mcc = compute_metrics(get_task("cola"), logits, labels)["mcc"]
    assert mcc == pytest.approx(100 * (2 * 1 - 1 * 1) / np.sqrt(3 * 2 * 3 * 2))  # (TP·TN − FP·FN)/sqrt(...)
    reg = compute_metrics(get_task("stsb"), np.array([[1.0], [2.0], [4.0]]), np.array([1.0, 2.0, 3.0]))
    assert reg["spearman"] == pytest.approx(100.0) and 90 < reg["pearson"] < 100


def test_clear_errors_for_missing_data(tmp_path, monkeypatch):
    task = glue_tasks.get_task("rte")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        glue_tasks.load_task(task, tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"RTE/train\.tsv"):
        glue_tasks.load_task(task, tmp_path)
    with pytest.raises(ValueError, match="unknown GLUE task"):
        glue_tasks.get_task("squad")

    # Without --data-dir the Hub is asked; when that fails, the error says to pass --data-dir.
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(RuntimeError, match="--data-dir"):
        glue_tasks.load_task(task, None)


# ---------------------------------------------------------------------------------------------------------------
# End to end: a few training steps per task family
# ---------------------------------------------------------------------------------------------------------------


def _run(tiny_bert, data_dir, out, task, methods="ssmlora,lora", extra=()):
    return glue.main(["--task", task, "--method", methods, "--model", str(tiny_bert), "--data-dir", str(data_dir),
                      "--epochs", "1", "--batch-size", "8", "--max-length", "32", "--output-dir", str(out), *extra])


# Adapter sizes on the tiny BERT (hidden 32, 4 layers) at r = 8: LoRA on query+value in all 4 layers,
# 8 x r(32+32) = 4096; SSMLoRA on query in layers 0, 2 and value in 1, 3, 4 x (r(32+32) + 2r^2) = 2560.
LORA_PARAMS, SSMLORA_PARAMS = 8 * 8 * 64, 4 * (8 * 64 + 2 * 64)


@pytest.mark.parametrize(
    ("task", "metric_keys", "num_labels"),
    [
        ("sst2", ["accuracy"], 2),  # single sentence
        ("mrpc", ["f1", "accuracy"], 2),  # sentence pair, F1 + accuracy
        ("stsb", ["pearson", "spearman"], 1),  # regression
        ("mnli", ["dev_matched/accuracy", "dev_mismatched/accuracy"], 3),  # 3 classes, two dev sets
    ],
)
def test_task_families_train_and_report(tiny_bert, glue_dir, tmp_path, task, metric_keys, num_labels):
    assert _run(tiny_bert, glue_dir, tmp_path, task) == 0
    for method, adapter in (("ssmlora", SSMLORA_PARAMS), ("lora", LORA_PARAMS)):
        run = json.loads((tmp_path / f"{task}-{method}-r8-seed0.json").read_text())
        assert sorted(run["metrics"]) == sorted(metric_keys)
        assert all(np.isfinite(v) for v in run["metrics"].values())
        assert run["trainable_params"] == {"adapter": adapter, "head": 32 * num_labels + num_labels,
                                           "total": adapter + 32 * num_labels + num_labels}
        assert run["train_examples"] == 24 and run["train_examples_per_s"] > 0 and np.isfinite(run["train_loss"])
        assert run["config"]["lr"] == 5e-4 and run["config"]["rank"] == 8
    table = (tmp_path / "table.md").read_text()
    assert "ssmlora r=8" in table and "lora r=8" in table and f"{task.upper()} {metric_keys[0]}" in table
    assert (tmp_path / "plot.png").stat().st_size > 0


def test_runs_resume_and_table_aggregates_seeds(tiny_bert, glue_dir, tmp_path, capsys):
    out = tmp_path / "runs"
    _run(tiny_bert, glue_dir, out, "cola", extra=["--seed", "0,1", "--max-train-samples", "16"])
    first = {p.name: p.stat().st_mtime_ns for p in out.glob("*.json")}
    assert len(first) == 4  # 2 methods x 2 seeds
    run = json.loads((out / "cola-lora-r8-seed1.json").read_text())
    assert run["train_examples"] == 16 and run["train_examples_full"] == 24 and "mcc" in run["metrics"]
    capsys.readouterr()
    _run(tiny_bert, glue_dir, out, "cola", extra=["--seed", "0,1", "--max-train-samples", "16"])
    assert "skip cola-lora-r8-seed1: identical run already stored" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.json")} == first  # nothing was run again
    rows = [line for line in (out / "table.md").read_text().splitlines() if line.startswith("| lora r=8")]
    assert " ± " in rows[0] and rows[0].rstrip(" |").endswith("2")  # mean ± std over the 2 seeds


def test_changed_data_or_options_are_rerun_not_reported_done(tiny_bert, glue_dir, tmp_path, capsys):
    """A run trained on a truncated train.tsv was once reported "already done" on the real data: resume compared
    the options only. Now the data files' contents are part of a run's identity."""
    data = tmp_path / "glue"
    (data / "RTE").mkdir(parents=True)
    for f in (glue_dir / "RTE").iterdir():
        (data / "RTE" / f.name).write_bytes(f.read_bytes())
    out = tmp_path / "runs"
    _run(tiny_bert, data, out, "rte", methods="lora")
    assert json.loads((out / "rte-lora-r8-seed0.json").read_text())["train_examples_full"] == 24
    lines = (data / "RTE" / "train.tsv").read_text().splitlines(keepends=True)
    (data / "RTE" / "train.tsv").write_text("".join(lines[:13]))  # header + 12 rows
    capsys.readouterr()
    _run(tiny_bert, data, out, "rte", methods="lora")
    assert "rerun rte-lora-r8-seed0: rte-lora-r8-seed0.json was made with other settings: data" in \
        capsys.readouterr().err
    assert json.loads((out / "rte-lora-r8-seed0.json").read_text())["train_examples_full"] == 12
    _run(tiny_bert, data, out, "rte", methods="lora", extra=["--max-length", "24"])  # an option changed
    assert "max_length: 32 -> 24" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--max-train-samples", "--max-eval-samples"])
def test_zero_samples_are_refused(flag, tiny_bert, capsys):
    with pytest.raises(SystemExit):
        glue.parse_args(["--task", "rte", "--model", str(tiny_bert), flag, "0"])
    assert f"{flag} must be positive, got 0" in capsys.readouterr().err


def test_a_non_integer_label_names_the_file_and_line(tmp_path):
    _write(tmp_path / "SST-2" / "train.tsv", [["good movie", 1], ["bad plot", "positive"]], ["sentence", "label"])
    with pytest.raises(ValueError, match=r"SST-2/train\.tsv, line 3: label 'positive' is not an integer class id"):
        glue_tasks.read_tsv(tmp_path / "SST-2" / "train.tsv", glue_tasks.get_task("sst2"))


def test_grad_norm_diagnostic_smoke(tiny_bert, glue_dir, tmp_path, capsys):
    """`benchmarks/glue/grad_norms.py` on the tiny BERT: every variant trains, the table is stored and a rerun
    with the same identity is skipped."""
    import benchmarks.glue.grad_norms as grad_norms

    argv = ["--data-dir", str(glue_dir), "--model", str(tiny_bert), "--steps", "3", "--batch-size", "4",
            "--out-dir", str(tmp_path)]
    rows = grad_norms.main(argv)
    assert [r["variant"] for r in rows] == list(grad_norms.VARIANTS)
    assert all(np.isfinite(float(r["max norm"])) for r in rows)
    assert (tmp_path / "seed0.md").read_text().count("| ssmlora") == 5
    capsys.readouterr()
    assert grad_norms.main(argv) == rows
    assert "skip seed0: identical run already stored" in capsys.readouterr().err


def test_full_and_bitfit(tiny_bert, glue_dir, tmp_path):
    assert _run(tiny_bert, glue_dir, tmp_path, "rte", methods="full,bitfit", extra=["--lr", "1e-3"]) == 0
    full = json.loads((tmp_path / "rte-full-seed0.json").read_text())
    bitfit = json.loads((tmp_path / "rte-bitfit-seed0.json").read_text())
    assert full["trainable_params"]["total"] == full["base_model_params"]
    assert 0 < bitfit["trainable_params"]["adapter"] < full["trainable_params"]["adapter"] / 10
    assert full["trainable_params"]["head"] == bitfit["trainable_params"]["head"] == 66


def test_paper_preset_uses_raw_alpha(tiny_bert, glue_dir, tmp_path):
    args = glue.parse_args(["--task", "rte", "--preset", "paper", "--model", str(tiny_bert)])
    assert args.ssmlora_scaling == "raw" and args.rank == 8 and args.alpha == 16
    args = glue.parse_args(["--task", "rte", "--preset", "paper", "--ssmlora-scaling", "rank", "--rank", "4",
                            "--model", str(tiny_bert)])
    assert args.ssmlora_scaling == "rank" and args.rank == 4  # explicit options win over the preset


def test_real_glue_slice(tiny_bert, shared_data, tmp_path):
    """The shared GLUE copy reads with the documented row counts, and a tiny slice of it trains."""
    expected = {"rte": (2490, 277), "mrpc": (3668, 408), "cola": (8551, 1043)}
    for name, (n_train, n_dev) in expected.items():
        train, devs = glue_tasks.load_task(glue_tasks.get_task(name), shared_data / "glue")
        assert (len(train), len(devs["dev"])) == (n_train, n_dev)
    assert _run(tiny_bert, shared_data / "glue", tmp_path, "mrpc",
                extra=["--max-train-samples", "16", "--max-eval-samples", "16"]) == 0
    run = json.loads((tmp_path / "mrpc-ssmlora-r8-seed0.json").read_text())
    assert run["train_examples_full"] == 3668 and run["dev_examples"] == {"dev": 16}


def test_interleaved_throughput_measurement(tiny_bert, glue_dir, tmp_path):
    assert _run(tiny_bert, glue_dir, tmp_path, "rte", extra=["--throughput-steps", "2", "--batch-size", "4"]) == 0
    result = json.loads((tmp_path / "throughput-rte-r8.json").read_text())
    assert result["timed_steps"] == 2 and set(result["methods"]) == {"ssmlora", "lora"}
    assert all(m["train_examples_per_s"] > 0 for m in result["methods"].values())
    assert not (tmp_path / "table.md").exists()  # timing only: no training runs, no table


# ---------------------------------------------------------------------------------------------------------------
# The ablations of SSMLoRA's state path, learning-rate selection, majority baselines and paired differences
# ---------------------------------------------------------------------------------------------------------------


def test_lora_sparse_targets_exactly_ssmlora_modules(tiny_bert):
    from transformers import AutoModelForSequenceClassification

    args = glue.parse_args(["--task", "sst2", "--model", str(tiny_bert)])
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
    names = glue.ssmlora_module_names(model, args)
    assert names == [f"bert.encoder.layer.{i}.attention.self.{'query' if i % 2 == 0 else 'value'}" for i in range(4)]
    assert not any("lora" in n for n, _ in model.named_modules())  # the model itself was not wrapped


def test_ablation_methods_majority_baseline_and_paired_differences(tiny_bert, glue_dir, tmp_path):
    methods = "ssmlora,lora,lora-sparse,lora-half"
    assert _run(tiny_bert, glue_dir, tmp_path, "sst2", methods=methods, extra=["--seed", "0,1"]) == 0
    runs = {m: [json.loads((tmp_path / f"sst2-{m}-r{4 if m == 'lora-half' else 8}-seed{s}.json").read_text())
                for s in (0, 1)] for m in methods.split(",")}
    # LoRA on SSMLoRA's four modules, and LoRA at half the rank on all eight: both half of LoRA's parameters.
    assert runs["lora-sparse"][0]["trainable_params"]["adapter"] == 4 * 8 * 64 == LORA_PARAMS // 2
    assert runs["lora-half"][0]["trainable_params"]["adapter"] == 8 * 4 * 64 == LORA_PARAMS // 2
    assert runs["lora-half"][0]["config"]["alpha"] == 8  # alpha / r kept: the same scale as lora
    run = runs["ssmlora"][0]
    assert len(run["dev_predictions"]["dev"]) == len(run["dev_labels"]["dev"]) == 10
    assert run["majority_score"] == 50.0  # train labels alternate 0/1: majority class 0, dev holds 5 of each
    table = (tmp_path / "table.md").read_text()
    assert "| majority class | 0 | 0 | 50.00 |" in table
    for other in ("lora", "lora-sparse", "lora-half"):
        diffs = [a["score"] - b["score"] for a, b in zip(runs["ssmlora"], runs[other])]
        row = next(line for line in table.splitlines() if line.startswith(f"| SST2 | {other} |"))
        assert f"{diffs[0]:+.2f}, {diffs[1]:+.2f}" in row and f"{np.mean(diffs):+.2f} [" in row


def test_learning_rate_selection_on_a_held_out_slice(tiny_bert, glue_dir, tmp_path):
    sel = tmp_path / "select"
    for lr in ("1e-4", "3e-2"):
        assert _run(tiny_bert, glue_dir, sel, "sst2", extra=["--lr", lr, "--holdout-fraction", "0.25"]) == 0
    run = json.loads((sel / "sst2-lora-r8-lr0.03-seed0.json").read_text())
    assert run["dev_examples"] == {"holdout": 6} and run["train_examples"] == 18  # 24 train rows, never dev
    best = {}
    for m in ("lora", "ssmlora"):
        scores = {lr: json.loads((sel / f"sst2-{m}-r8-lr{lr}-seed0.json").read_text())["score"]
                  for lr in ("0.0001", "0.03")}
        best[m] = float(max(scores, key=lambda lr: (scores[lr], -float(lr))))
    out = tmp_path / "main"
    assert _run(tiny_bert, glue_dir, out, "sst2", methods="ssmlora,lora-sparse", extra=["--lr-from", str(sel)]) == 0
    assert json.loads((out / "sst2-ssmlora-r8-seed0.json").read_text())["config"]["lr"] == best["ssmlora"]
    assert json.loads((out / "sst2-lora-sparse-r8-seed0.json").read_text())["config"]["lr"] == best["lora"]
    with pytest.raises(SystemExit):  # nothing to select from
        _run(tiny_bert, glue_dir, tmp_path / "x", "sst2", extra=["--lr-from", str(tmp_path / "empty")])


@pytest.mark.parametrize("bad", [["--max-train-samples", "0"], ["--max-eval-samples", "0"], ["--lr", "1e-3",
                                 "--lr-from", "x"], ["--holdout-fraction", "1.5"], ["--method", "lora-r4"]])
def test_bad_arguments_stop_before_training(bad):
    with pytest.raises(SystemExit):
        glue.parse_args(["--task", "sst2", *bad])


def test_majority_metrics():
    mrpc, cola = glue_tasks.get_task("mrpc"), glue_tasks.get_task("cola")
    m = glue_tasks.majority_metrics(mrpc, [1, 1, 0], np.array([1, 0, 1, 1]))  # always "paraphrase"
    assert m["accuracy"] == pytest.approx(75.0) and m["f1"] == pytest.approx(100 * 2 * 0.75 / 1.75)
    assert glue_tasks.majority_metrics(cola, [1, 1, 0], np.array([1, 0]))["mcc"] == 0.0


@pytest.mark.parametrize("name", ["mrpc", "cola", "sst2", "mnli"])
def test_bootstrap_scores_equal_scikit_learn_on_each_resample(name):
    """The vectorised task scores the paired-difference table resamples (benchmarks.harness.stats, F1 and MCC from
    confusion counts) equal the official metrics recomputed on each resample (MNLI: 3 classes)."""
    task, rng, n = glue_tasks.get_task(name), np.random.default_rng(1), 50
    labels, outputs = rng.integers(0, task.num_labels, n), rng.integers(0, task.num_labels, n)
    resamples = rng.integers(0, n, size=(20, n))
    expected = [glue_tasks.task_score(task, glue_tasks.compute_metrics(task, np.eye(task.num_labels)[outputs[i]],
                                                                       labels[i])) for i in resamples]
    assert stats.score(outputs[resamples], labels[resamples], task.metrics) == pytest.approx(expected, abs=1e-9)
