"""python scripts/prepare_model.py SRC OUT [--dtype bf16|fp16|fp32]"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
from slowllama.cli import main  # noqa: E402

sys.exit(main(prog_command='prepare'))
