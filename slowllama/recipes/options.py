"""The finetune command's flags, in typed groups, one table for the command line and the YAML --config file.

Each group is a table flag -> (type, default, help); the training group is TrainConfig's fields, one
flag a field (its type and default the field's own), and train_config() builds TrainConfig from it.
The BCI's group (bci/options.py) is parsed by finetune but shown only by `slowllama bci --help`.
Every flag defaults to None in argparse, so that "given on the command line" can be told apart from
"not given": the command line wins over the YAML file, which wins over the defaults in the tables (or,
for a BCI run, BCI_DEFAULTS). Shared by the finetune recipes (text, BCI, the demo) and cli.py's dispatch.
"""
import argparse
import dataclasses

from ..bci.options import BCI_DEFAULTS, BCI_FLAGS
from ..errors import SlowLlamaError
from ..training.settings import TrainConfig

# flag -> (type, default, help); the dest is the flag with '-' -> '_'
MODEL_AND_DATA = {
    'model': (str, None, 'prepared model folder (prepare_model.py)'),
    'data': (str, None, 'training data: .txt, .jsonl / .json with "text", alpaca or chat records, or a Hugging '
                        'Face dataset on disk (a save_to_disk folder, .parquet, .arrow, .csv)'),
    'field': (str, None, 'the column holding the text (a string) or the conversation (a list of messages), '
                         'when it is not "text" / "messages"'),
    'split': (str, None, 'the split of a dataset folder that has several (default: train)'),
    'data-format': (str, None, 'text | jsonl | alpaca | chat (default: from the file)'),
    'chat-template': (str, None, "chat records (and conversational DPO pairs) rendered with this Jinja file, or "
                                 "with the model's template of this name (e.g. tool_use), instead of its default"),
    'chat-format': (str, 'template', 'template | plain: chat records as the chat template renders them, or as '
                                     '"role: content" lines (a model without a template needs one of the two)'),
    'batch-size': (int, 1, 'sequences per micro-batch'),
    'seq-len': (int, 256, 'tokens per sequence'),
    'pack': (bool, False, 'pack short samples (or text chunks) into full --seq-len rows; each sample attends '
                          'to itself only'),
    'val-fraction': (float, 0.0, 'share of the data held out for validation'),
    'objective': (str, 'sft', 'sft | dpo (preference pairs {"prompt", "chosen", "rejected"} in --data)'),
    'beta': (float, 0.1, 'DPO beta: how far the policy may move from the reference'),
}
LORA = {
    'lora-rank': (int, 8, 'LoRA rank r'),
    'lora-alpha': (float, 16.0, 'LoRA alpha (scale = alpha / r)'),
    'lora-dropout': (float, 0.0, 'dropout on the LoRA input'),
    'dropout': (float, 0.0, "dropout in the model's blocks (attention and residual branches)"),
    'targets': (str, 'q,v', 'LoRA targets: q,k,v,o,gate,up,down (or wq..w3, q_proj..down_proj)'),
    'adapter': (str, None, 'start from this adapter folder'),
    'router-aux-loss-coef': (float, None, "Mixture-of-Experts with --targets router: the load-balancing loss's "
                                          "weight (default: the model config's router_aux_loss_coef; 0: off)"),
}
ENGINE = {
    'device': (str, None, 'cpu | cuda | mps (default: cuda, then mps, then cpu)'),
    'dtype': (str, None, 'bf16 | fp16 | fp32 (default: fp32 on cpu, bf16 elsewhere)'),
    'offload': (str, 'auto', 'where frozen weights wait: auto | disk | ram | device'),
    'max-device-mem': (str, None, 'cap on device memory for the automatic choices (--offload auto, the step\'s '
                                  'plan; on a cpu: what the step may hold), e.g. 20GB'),
    'max-ram': (str, None, 'cap on host memory for frozen weights with --offload auto, e.g. 48GB'),
    'micro-batches-per-trip': (int, None, 'how many of a step\'s micro-batches travel through the blocks '
                                          'together (default: as many as the memory plan fits)'),
    'keep-activations': (str, 'auto', 'auto | all | none | N: blocks that keep their activations for the backward '
                                      'instead of recomputing them (auto: the last ones that fit in memory)'),
}
# TrainConfig's fields, one flag each (the field's name with '-'): the help here, type and default there
TRAINING_HELP = {
    'iters': 'optimizer steps',
    'grad-accum': 'micro-batches per optimizer step; they travel through each block together, so a block '
                  'crosses to the device twice a step whatever their number',
    'lr': 'peak learning rate',
    'beta1': 'AdamW beta1',
    'beta2': 'AdamW beta2',
    'adam-eps': 'AdamW epsilon',
    'weight-decay': 'AdamW weight decay',
    'warmup': 'steps of linear learning-rate warm-up',
    'schedule': 'cosine | constant (after the warm-up)',
    'min-lr-ratio': 'cosine floor, as a fraction of --lr',
    'grad-clip': 'clip the global gradient norm to this (0: off)',
    'seed': 'random seed (LoRA init, data order, dropout)',
    'save-every': 'checkpoint every N steps (0: at the end only)',
    'eval-every': 'evaluate every N steps (0: at the end only)',
    'keep-checkpoints': 'keep only the newest N checkpoints (0: all)',
    'patience': 'stop after N evaluations without a better validation score; the best adapter is kept as '
                'best/ (0: never stop)',
}
RUN = {
    'out': (str, None, 'run folder (default: a new folder under runs/)'),
    'resume': (bool, False, 'continue the run in --out from its newest complete checkpoint'),
    'config': (str, None, 'YAML file whose keys are these flag names; flags on the command line win'),
    'eval-batches': (int, 16, 'validation batches per evaluation at most'),
    'prompt': (str, None, 'prompt to complete at each evaluation'),
    'max-new-tokens': (int, 32, 'length of that completion'),
    'skip-nonfinite': (bool, False, 'skip a step whose loss or gradient is not finite instead of stopping'),
    'verify': (bool, False, 'check every model file against its manifest checksum before starting'),
    'tensorboard': (bool, False, 'also write the metrics as TensorBoard event files in the run folder '
                                 '(pip install slowllama[tensorboard])'),
}


def dest(flag):
    return flag.replace('-', '_')


def settings_group(settings, helps):
    """flag -> (type, default, help) of a settings dataclass: one flag per field, named as the field
    (underscores as dashes), its type and default the field's own, so the two cannot drift apart."""
    fields = {f.name: f for f in dataclasses.fields(settings)}
    return {flag: (fields[dest(flag)].type, fields[dest(flag)].default, help) for flag, help in helps.items()}


def settings_of(settings, opts):
    """A settings dataclass built from resolved flags: each field from the flag of its name."""
    return settings(**{f.name: getattr(opts, f.name) for f in dataclasses.fields(settings)})


TRAINING = settings_group(TrainConfig, TRAINING_HELP)
# title -> group, in the order --help shows them; the BCI's group is hidden from finetune --help
GROUPS = {'model and data': MODEL_AND_DATA, 'LoRA': LORA, 'device and memory (the step)': ENGINE,
          'training (the optimizer loop)': TRAINING, 'run folder, evaluation, logging': RUN}
BCI_GROUP = 'BCI (signals to text: --bci-data DIR picks the BCI recipe, slowllama/bci/train.py)'
FLAGS = {flag: spec for group in (*GROUPS.values(), BCI_FLAGS) for flag, spec in group.items()}


def train_config(opts):
    """The optimizer loop's settings from the resolved flags of the training group."""
    return settings_of(TrainConfig, opts)


def add_arguments(p, show_bci=False):
    """finetune's flags, a help section per group. The BCI's flags are accepted by every finetune (a
    --bci-data run goes to the BCI recipe) but listed only where show_bci (the `bci` command)."""
    defaults = BCI_DEFAULTS if show_bci else {}  # the defaults a BCI run gets, shown where it is the command
    for title, group in GROUPS.items():
        _add_group(p.add_argument_group(title), group, True, defaults)
    _add_group(p.add_argument_group(BCI_GROUP) if show_bci else p, BCI_FLAGS, show_bci, defaults)
    if not show_bci:
        p.epilog = 'A BCI run (signals to text) has flags of its own: slowllama bci --help lists them.'


def _add_group(p, group, shown, defaults):
    for flag, (kind, default, help) in group.items():
        default = defaults.get(flag, default)
        if not shown:
            help = argparse.SUPPRESS
        elif default not in (None, False):
            help = f'{help} (default {default})'
        if kind is bool:
            p.add_argument(f'--{flag}', action='store_true', default=None, help=help)
        else:
            p.add_argument(f'--{flag}', type=kind, default=None, help=help)


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
