"""The machine and software a run is made on (stored with every result, and part of its identity).

    `host_info()`               python, torch, platform, CPUs, threads, device, load average
    `device_tag()`              "cpu" or the GPU's name as a folder name: results go to <suite>/results/<tag>/
    `package_versions()`        the versions of the packages that can change a result
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
import platform
import re
import sys
from typing import Any

# Packages whose version can change a result; missing ones are skipped.
VERSIONED_PACKAGES = ("torch", "transformers", "peft", "accelerate", "datasets", "tokenizers", "triton", "bm25s")


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


@functools.lru_cache(maxsize=1)
def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions
