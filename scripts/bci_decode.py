"""python scripts/bci_decode.py --model M --run RUN --bci-data DIR [--split test] [--out preds.jsonl]"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
from slowllama.cli import main  # noqa: E402

sys.exit(main(prog_command='bci_decode'))
