"""The peft battery (`test_peft_battery.py`) is a stage of its own: it imports peft's test sources, which `.ci/run`
unpacks first, and takes minutes. It is collected only when selected with `-m peft_battery`."""

from __future__ import annotations

BATTERY_MARK = "peft_battery"


def pytest_configure(config):
    config.addinivalue_line("markers", f"{BATTERY_MARK}: peft's own generic tuner tests run on SSMLoRA (-m {BATTERY_MARK})")


def pytest_ignore_collect(collection_path, config):
    if collection_path.name.startswith("test_peft_battery") and config.option.markexpr != BATTERY_MARK:
        return True
    return None
