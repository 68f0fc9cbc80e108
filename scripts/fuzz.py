"""Fuzz slowllama's readers for longer than CI does (the harness is tests/fuzz.py).

    python scripts/fuzz.py --minutes 30 [--seed S] [--workers W] [--cli-cases N]
    python scripts/fuzz.py --replay READER SEED      # one case again, with its traceback

Prints the counts per reader, mutation kind and outcome, and every finding with the seed that
replays it; exits 1 when there was a finding."""
import argparse
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, 'tests')]

import fuzz  # noqa: E402  (tests/fuzz.py)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--minutes', type=float, default=5.0, help='time for the in-process readers')
    p.add_argument('--seed', type=int, default=int(time.time()))
    p.add_argument('--workers', type=int, default=2)
    p.add_argument('--cli-cases', type=int, default=3, help='cases per command through the real command line')
    p.add_argument('--readers', default=None, help='comma-separated subset of ' + ','.join(fuzz.READERS))
    p.add_argument('--replay', nargs=2, metavar=('READER', 'SEED'))
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix='slowllama-fuzz-') as root:
        corpus = fuzz.build_corpus(root)
        if args.replay:
            reader, seed = args.replay[0], int(args.replay[1])
            if reader.startswith('cli-'):
                slots = {n: fuzz.gguf_slots(corpus[n]) for n in corpus if n.endswith('.gguf')}
                outcome, kind, detail = fuzz.run_cli_case(reader[4:], seed, corpus, slots)
            else:
                outcome, kind, detail = fuzz.replay(corpus, reader, seed)
            print(f'{outcome} ({kind})\n{detail}')
            return 1 if outcome in fuzz.FINDINGS else 0
        print(f'seed {args.seed}', flush=True)
        log = lambda line: print(line, flush=True)  # noqa: E731
        readers = args.readers.split(',') if args.readers else None
        counts, findings = fuzz.fuzz(corpus, args.minutes * 60, seed=args.seed, workers=args.workers,
                                     readers=readers, log=log)
        if args.cli_cases:
            cli_counts, cli_findings = fuzz.fuzz_cli(corpus, args.cli_cases, seed=args.seed, log=log)
            counts.update(cli_counts)
            findings += cli_findings
    print(f'{sum(counts.values())} cases')
    print('\n'.join(fuzz.report(counts)))
    for reader, seed, outcome, kind, detail in findings:
        print(f'\n{outcome}: {reader} seed {seed} ({kind}); replay: python scripts/fuzz.py --replay {reader} {seed}')
        print(detail)
    return 1 if findings else 0


if __name__ == '__main__':
    sys.exit(main())
