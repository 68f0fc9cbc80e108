"""python scripts/bench.py [--device cpu|cuda] [--shape 0.4b|7b] [--plan] ...: the side-by-side benchmark."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
from slowllama.cli import main  # noqa: E402

sys.exit(main(prog_command='bench'))
