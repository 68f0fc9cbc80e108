"""The verify recipe: every file of a prepared model against the sha256 in its manifest."""
from ..weights.prepared import verify_model


def add_arguments(p):
    p.add_argument('model', help='a prepared model folder')


def run(args):
    verify_model(args.model)
    print(f'{args.model}: every file matches its manifest checksum')
