"""The finetune recipe (supervised, on text): `finetune --model M --data FILE [flags]`. The flags and
their YAML twin are in options.py; cli.py sends a run with no flags at all to the demo and one with
--bci-data to the BCI recipe."""
import sys

from .run_setup import build_sft, train_and_report


def run(opts, stream=None):
    """Train as `opts` (resolved flags) say; returns the Trainer's summary."""
    _, _, trainer = build_sft(opts, stream or sys.stderr)
    return train_and_report(trainer, resume=opts.resume)
