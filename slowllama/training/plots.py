"""Pictures of runs: the loss (train and eval), the learning rate and, when a run trains DPO, the
reward margins, read from the run folders' metrics.jsonl and drawn with matplotlib (an optional
extra: pip install slowllama[plot]). A training run keeps its own loss.png up to date (LossPlot);
`slowllama plot RUN [RUN...]` draws several runs into one picture, each run one colour."""
import gc
import json
import os

from ..errors import SlowLlamaError
from ..weights.files import atomic_open
from ..weights.host_memory import HeapTrimmer

HINT = 'pip install slowllama[plot]'
METRICS = 'metrics.jsonl'
# panel title -> (metrics.jsonl key, curve label), in the order the panels stand side by side
PANELS = {
    'loss': (('loss', 'train'), ('eval_loss', 'eval')),
    'learning rate': (('lr', 'lr'),),
    'DPO reward margin': (('rewards/margins', 'train'), ('eval_rewards/margins', 'eval')),
}


class MissingMatplotlib(SlowLlamaError):
    pass


def read_metrics(run_dir):
    """The rows of RUN/metrics.jsonl (a torn last line is skipped)."""
    path = os.path.join(str(run_dir), METRICS)
    try:
        with open(path, encoding='utf-8') as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        raise SlowLlamaError(f'{run_dir}: no {METRICS} (is it a finetune run folder?)') from None
    rows = []
    for line in lines:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return [row for row in rows if isinstance(row, dict) and 'step' in row]


def curves(rows):
    """{panel title: [(label, steps, values)]} for the panels the rows have data for."""
    panels = {}
    for title, keys in PANELS.items():
        found = []
        for key, label in keys:
            points = [(row['step'], row[key]) for row in rows if isinstance(row.get(key), (int, float))]
            if points:
                found.append((label, [s for s, _ in points], [v for _, v in points]))
        if found:
            panels[title] = found
    return panels


def figure(runs):
    """runs: {name: metrics rows} -> a matplotlib Figure, one panel per quantity side by side, each
    run in its own colour (train solid, eval dashed with markers)."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise MissingMatplotlib(f'drawing plots needs matplotlib: {HINT}') from None
    per_run = {name: curves(rows) for name, rows in runs.items()}
    titles = [t for t in PANELS if any(t in panels for panels in per_run.values())]
    if not titles:
        raise SlowLlamaError(f'{", ".join(runs)}: no steps in {METRICS} yet, nothing to draw')
    fig = Figure(figsize=(5 * len(titles), 4), layout='constrained')
    axes = fig.subplots(1, len(titles), squeeze=False)[0]
    for ax, title in zip(axes, titles):
        for n, (name, panels) in enumerate(per_run.items()):
            for label, steps, values in panels.get(title, []):
                style = dict(linestyle='--', marker='o', markersize=3) if label == 'eval' else {}
                shown = f'{name} {label}' if len(runs) > 1 else label
                ax.plot(steps, values, color=f'C{n}', label=shown, **style)
        ax.set_title(title)
        ax.set_xlabel('step')
        ax.grid(alpha=0.3)
        ax.legend(fontsize='small')
    if 'learning rate' in titles:  # small numbers: 1e-4, not 0.0001
        axes[titles.index('learning rate')].ticklabel_format(axis='y', style='sci', scilimits=(-2, 3))
    return fig


def save_png(fig, path):
    """Write the figure as a PNG under a temporary name, then rename it into place."""
    with atomic_open(str(path), 'wb') as f:
        fig.savefig(f, format='png', dpi=100)


def plot_runs(run_dirs, out):
    """Draw the runs' metrics into the PNG `out`; the runs are named by their folders."""
    runs = {}
    for run_dir in run_dirs:
        name = os.path.basename(os.path.normpath(str(run_dir)))
        while name in runs:  # two folders of the same name in different places
            name += "'"
        runs[name] = read_metrics(run_dir)
    save_png(figure(runs), out)
    return out


class LossPlot:
    """A training run's loss.png, redrawn at each evaluation and at the end. Never fails the run: a
    missing matplotlib (or any drawing error) is one line in the log, once."""

    def __init__(self, run_dir, log):
        self.run_dir, self.log, self.failed = str(run_dir), log, False
        self.trim_heap = HeapTrimmer()

    def start(self, step):
        pass

    def record(self, row):
        pass

    def refresh(self):
        if self.failed:
            return
        try:
            plot_runs([self.run_dir], os.path.join(self.run_dir, 'loss.png'))
        except Exception as e:  # a picture is never worth a failed run
            self.failed = True
            self.log(f'loss.png not drawn: {e}')
        # a figure is a web of reference cycles, and its buffers, once freed, stay in glibc's heap
        # between what lives on: a long run's resident memory crept up by ~30 MB. Free and give back.
        gc.collect()
        self.trim_heap()

    def close(self):
        self.refresh()
