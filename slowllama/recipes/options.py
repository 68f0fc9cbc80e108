"""The finetune command's flags, one table for the command line and the YAML --config file.

Every flag defaults to None in argparse, so that "given on the command line" can be told apart from
"not given": the command line wins over the YAML file, which wins over the defaults in FLAGS (or, for a
BCI run, BCI_DEFAULTS). Shared by the finetune recipes (text, BCI, the demo) and cli.py's dispatch.
"""
import argparse

from ..bci.options import BCI_DEFAULTS, BCI_FLAGS
from ..errors import SlowLlamaError

# flag -> (type, default, help); the dest is the flag with '-' -> '_'
FLAGS = {
    'model': (str, None, 'prepared model folder (prepare_model.py)'),
    'data': (str, None, 'training data: .txt, .jsonl / .json with "text", alpaca or chat records, or a Hugging '
                        'Face dataset on disk (a save_to_disk folder, .parquet, .arrow, .csv)'),
    'field': (str, None, 'the column holding the text (a string) or the conversation (a list of messages), '
                         'when it is not "text" / "messages"'),
    'split': (str, None, 'the split of a dataset folder that has several (default: train)'),
    'out': (str, None, 'run folder (default: a new folder under runs/)'),
    'device': (str, None, 'cpu | cuda | mps (default: cuda, then mps, then cpu)'),
    'iters': (int, 100, 'optimizer steps'),
    'batch-size': (int, 1, 'sequences per micro-batch'),
    'seq-len': (int, 256, 'tokens per sequence'),
    'lr': (float, 1e-4, 'peak learning rate'),
    'lora-rank': (int, 8, 'LoRA rank r'),
    'lora-alpha': (float, 16.0, 'LoRA alpha (scale = alpha / r)'),
    'lora-dropout': (float, 0.0, 'dropout on the LoRA input'),
    'dropout': (float, 0.0, "dropout in the model's blocks (attention and residual branches)"),
    'targets': (str, 'q,v', 'LoRA targets: q,k,v,o,gate,up,down (or wq..w3, q_proj..down_proj)'),
    'seed': (int, 0, 'random seed (LoRA init, data order, dropout)'),
    'save-every': (int, 0, 'checkpoint every N steps (0: at the end only)'),
    'resume': (bool, False, 'continue the run in --out from its newest complete checkpoint'),
    'offload': (str, 'auto', 'where frozen weights wait: auto | disk | ram | device'),
    'max-device-mem': (str, None, 'cap on device memory for the automatic choices (--offload auto, the step\'s '
                                  'plan; on a cpu: what the step may hold), e.g. 20GB'),
    'max-ram': (str, None, 'cap on host memory for frozen weights with --offload auto, e.g. 48GB'),
    'skip-nonfinite': (bool, False, 'skip a step whose loss or gradient is not finite instead of stopping'),
    'verify': (bool, False, 'check every model file against its manifest checksum before starting'),
    'dtype': (str, None, 'bf16 | fp16 | fp32 (default: fp32 on cpu, bf16 elsewhere)'),
    'adapter': (str, None, 'start from this adapter folder'),
    'data-format': (str, None, 'text | jsonl | alpaca | chat (default: from the file)'),
    'chat-template': (str, None, "chat records (and conversational DPO pairs) rendered with this Jinja file, or "
                                 "with the model's template of this name (e.g. tool_use), instead of its default"),
    'chat-format': (str, 'template', 'template | plain: chat records as the chat template renders them, or as '
                                     '"role: content" lines (a model without a template needs one of the two)'),
    'pack': (bool, False, 'pack short samples (or text chunks) into full --seq-len rows; each sample attends '
                          'to itself only'),
    'val-fraction': (float, 0.0, 'share of the data held out for validation'),
    'eval-every': (int, 0, 'evaluate every N steps (0: at the end only)'),
    'eval-batches': (int, 16, 'validation batches per evaluation at most'),
    'patience': (int, 0, 'stop after N evaluations without a better validation score; the best adapter is '
                         'kept as best/ (0: never stop)'),
    'prompt': (str, None, 'prompt to complete at each evaluation'),
    'max-new-tokens': (int, 32, 'length of that completion'),
    'grad-accum': (int, 1, 'micro-batches per optimizer step; they travel through each block together, so a '
                           'block crosses to the device twice a step whatever their number'),
    'micro-batches-per-trip': (int, None, 'how many of a step\'s micro-batches travel through the blocks '
                                          'together (default: as many as the memory plan fits)'),
    'keep-activations': (str, 'auto', 'auto | all | none | N: blocks that keep their activations for the backward '
                                      'instead of recomputing them (auto: the last ones that fit in memory)'),
    'warmup': (int, 0, 'steps of linear learning-rate warm-up'),
    'schedule': (str, 'cosine', 'cosine | constant (after the warm-up)'),
    'min-lr-ratio': (float, 0.0, 'cosine floor, as a fraction of --lr'),
    'weight-decay': (float, 0.0, 'AdamW weight decay'),
    'beta1': (float, 0.9, 'AdamW beta1'),
    'beta2': (float, 0.999, 'AdamW beta2'),
    'adam-eps': (float, 1e-8, 'AdamW epsilon'),
    'grad-clip': (float, 1.0, 'clip the global gradient norm to this (0: off)'),
    'keep-checkpoints': (int, 0, 'keep only the newest N checkpoints (0: all)'),
    'tensorboard': (bool, False, 'also write the metrics as TensorBoard event files in the run folder '
                                 '(pip install slowllama[tensorboard])'),
    'config': (str, None, 'YAML file whose keys are these flag names; flags on the command line win'),
    'objective': (str, 'sft', 'sft | dpo (preference pairs {"prompt", "chosen", "rejected"} in --data)'),
    'beta': (float, 0.1, 'DPO beta: how far the policy may move from the reference'),
}
FLAGS.update(BCI_FLAGS)  # --bci-data DIR picks the BCI recipe (slowllama/bci/train.py)


def dest(flag):
    return flag.replace('-', '_')


def add_arguments(p):
    for flag, (kind, default, help) in FLAGS.items():
        shown = f'{help} (default {default})' if default not in (None, False) else help
        if kind is bool:
            p.add_argument(f'--{flag}', action='store_true', default=None, help=shown)
        else:
            p.add_argument(f'--{flag}', type=kind, default=None, help=shown)


def resolve(args):
    """argparse Namespace (None = not given) -> Namespace with YAML values and defaults filled in."""
    given = {dest(f): getattr(args, dest(f), None) for f in FLAGS}
    from_file = read_config(given['config']) if given['config'] else {}
    values = {}
    bci = given['bci_data'] is not None or from_file.get('bci_data') is not None
    for flag, (_, default, _) in FLAGS.items():
        name = dest(flag)
        default = BCI_DEFAULTS.get(flag, default) if bci else default
        values[name] = next((v for v in (given[name], from_file.get(name)) if v is not None), default)
    return argparse.Namespace(**values)


def read_config(path):
    import yaml
    try:
        with open(path, encoding='utf-8') as f:
            raw = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise SlowLlamaError(f'{path}: config file not found (--config)') from None
    except yaml.YAMLError as e:
        raise SlowLlamaError(f'{path}: not valid YAML ({str(e).splitlines()[0]})') from None
    if not isinstance(raw, dict):
        raise SlowLlamaError(f'{path}: the config must be a mapping of flag names to values')
    values = {}
    for key, value in raw.items():
        flag = str(key).replace('_', '-')
        if flag not in FLAGS or flag == 'config':
            raise SlowLlamaError(f'{path}: unknown key {key!r} (keys are the finetune flag names)')
        values[dest(flag)] = _convert(path, key, FLAGS[flag][0], value)
    return values


def _convert(path, key, kind, value):
    if value is None:
        return None
    if kind is bool:
        if not isinstance(value, bool):
            raise SlowLlamaError(f'{path}: {key} must be true or false')
        return value
    if kind is str and isinstance(value, (list, tuple)):  # targets: [q, v]
        return ','.join(str(v) for v in value)
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise SlowLlamaError(f'{path}: {key} must be a {kind.__name__}, got {value!r}') from None


def nothing_given(args):
    return all(getattr(args, dest(f), None) is None for f in FLAGS)


def parse_bytes(text, flag):
    """'20GB', '3.5GiB', '512MB' or a plain number of bytes -> int (None stays None)."""
    if text is None:
        return None
    units = {'': 1, 'b': 1, 'kb': 1e3, 'mb': 1e6, 'gb': 1e9, 'tb': 1e12, 'kib': 2 ** 10, 'mib': 2 ** 20,
             'gib': 2 ** 30, 'tib': 2 ** 40, 'k': 2 ** 10, 'm': 2 ** 20, 'g': 2 ** 30, 't': 2 ** 40}
    number = str(text).strip().lower()
    digits = number.rstrip('abcdefghijklmnopqrstuvwxyz ')
    unit = number[len(digits):].strip()
    try:
        value = float(digits) * units[unit]
    except (KeyError, ValueError):
        raise SlowLlamaError(f'{flag}: cannot read {text!r} as a size (e.g. 20GB, 3.5GiB)') from None
    if value <= 0:
        raise SlowLlamaError(f'{flag} must be positive, got {text!r}')
    return int(value)
