"""--tensorboard: the run's metrics also as TensorBoard event files in the run folder, beside
metrics.jsonl (torch.utils.tensorboard; an optional extra: pip install slowllama[tensorboard]).
Tags as transformers' Trainer names them: train/loss, train/lr, eval/loss, ..."""
from ..errors import SlowLlamaError

HINT = 'pip install slowllama[tensorboard]'
NOT_SCALARS = ('step', 'skipped')


def tag(key):
    return f'eval/{key[len("eval_"):]}' if key.startswith('eval_') else f'train/{key}'


class TensorBoardLog:
    def __init__(self, run_dir):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise SlowLlamaError(f'tensorboard needs the tensorboard package: {HINT}') from None
        self.run_dir, self.writer_class, self.writer = str(run_dir), SummaryWriter, None

    def start(self, step):
        """A resumed run first drops what earlier event files hold after its checkpoint's step."""
        self.writer = self.writer_class(self.run_dir, purge_step=step + 1 if step else None)

    def record(self, row):
        for key, value in row.items():
            if key not in NOT_SCALARS and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(tag(key), value, row['step'])

    def refresh(self):
        self.writer.flush()

    def close(self):
        if self.writer is not None:
            self.writer.close()
            self.writer = None
