"""python scripts/make_bci_demo.py OUT_DIR [--preset external] [--trials-per-sentence N] [--noise X] [--jitter J] [--seed S]: a synthetic BCI set"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
from slowllama.cli import main  # noqa: E402

sys.exit(main(prog_command='bci_demo'))
