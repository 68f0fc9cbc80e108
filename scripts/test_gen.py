"""python scripts/test_gen.py MODEL_DIR [DEVICE] [--lora ADAPTER_OR_RUN_DIR] [--prompt TEXT] [--max-new-tokens N] [--temperature T] [--top-p P]"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
from slowllama.cli import main  # noqa: E402

sys.exit(main(prog_command='test_gen'))
