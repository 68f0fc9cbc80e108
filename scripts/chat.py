"""python scripts/chat.py MODEL_DIR [--lora RUN_OR_ADAPTER] [--device D] [--system TEXT] [--max-new-tokens N] [--temperature T]"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
from slowllama.cli import main  # noqa: E402

sys.exit(main(prog_command='chat'))
