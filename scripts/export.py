"""python scripts/export.py --model MODEL_DIR --lora ADAPTER_DIR --format meta|hf|peft --out DIR [--shards K] [--dtype ...]"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
from slowllama.cli import main  # noqa: E402

sys.exit(main(prog_command='export'))
