"""The plot recipe: `plot RUN [RUN...] [--out FILE.png]` draws the loss (train and eval), the
learning rate and DPO reward margins of one or more finetune runs into one PNG, each run in its own
colour (slowllama/training/plots.py; needs matplotlib: pip install slowllama[plot])."""
import os

from ..errors import SlowLlamaError
from ..training.plots import plot_runs


def add_arguments(p):
    p.add_argument('runs', nargs='+', help='finetune run folders (each with its metrics.jsonl)')
    p.add_argument('--out', default=None, help='the PNG to write (default: loss.png in the run folder for one '
                                              'run, runs.png in the current folder for several)')


def run(args):
    out = args.out or (os.path.join(args.runs[0], 'loss.png') if len(args.runs) == 1 else 'runs.png')
    if not out.lower().endswith('.png'):
        raise SlowLlamaError(f'--out {out}: the picture is a PNG; name it FILE.png')
    plot_runs(args.runs, out)
    print(out)
