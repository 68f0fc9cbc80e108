"""python scripts/bci_train.py --model M --bci-data DIR [--out RUN] [flags] (see --help): the BCI recipe,
the same run as finetune --bci-data; its --help lists the --bci-* flags beside finetune's."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
from slowllama.cli import main  # noqa: E402

sys.exit(main(prog_command='bci'))
