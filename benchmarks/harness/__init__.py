"""What every benchmark suite shares, one module per concern; a new runner imports these instead of writing its own.

    models        offline models and how to load them (GGUF folders too)
    adapters      the peft config of every compared method, parameter counts, shared frozen copies
    environment   host info, device tag (the results folder of a device), package versions
    identity      a run's identity: arguments, model, data files, versions, code
    store         the run store (one JSON per run, resumed only when identical) and atomic writes
    report        markdown and CSV tables
    cli           argparse types that name the bad value
    suite         the subcommand dispatch of a suite's `__main__`
    tables        the long-form `runs.csv` of each suite and its study tables, rebuilt from the stored runs
"""
