"""python scripts/finetune.py [flags] (no flags at all: the embedded demo); see --help"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
from slowllama.cli import main  # noqa: E402

sys.exit(main(prog_command='finetune'))
