"""python scripts/bci_eval.py --model MODEL_DIR [--out DIR] [--settings target|hard] [--iters N] [-- FINETUNE FLAGS]

Generalization of the BCI head on synthetic sets it never saw (issue 17): for each setting, a set is
generated with its own seed, the encoder + LoRA trained with `finetune --bci-data` (the run's best/
kept by validation), and the test trials decoded freely and with the set's sentences as --candidates,
beside the nearest-centroid baseline. Prints one line per setting and a JSON summary at the end.

    python scripts/prepare_model.py .../SmolLM2-135M-Instruct.Q4_1.gguf models/smollm2
    python scripts/bci_eval.py --model models/smollm2 --settings target
"""
import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
from slowllama.bci.baseline import nearest_centroid  # noqa: E402
from slowllama.bci.data import read_data  # noqa: E402
from slowllama.bci.decode import decode_trials, exact_match, load_decoder, rank_candidates, word_error_rate  # noqa: E402
from slowllama.bci.synthetic import PRESETS, make_demo_set  # noqa: E402
from slowllama.cli import main  # noqa: E402
from slowllama.tokenizer.tokenizer import load_tokenizer  # noqa: E402

EXTERNAL = PRESETS['external']
# name -> make_demo_set settings; seeds far from the demo's (0) and from the tests'
SETTINGS = {
    'target': {
        'external noise 0.6': dict(EXTERNAL, seed=101),
        'noise 1.0': dict(EXTERNAL, noise=1.0, seed=102),
        'test jitter 5, train jitter 2': dict(EXTERNAL, noise=0.8, jitter=2, test_jitter=5, seed=103),
        'noise 1.0 and test jitter 5, train jitter 2': dict(EXTERNAL, noise=1.0, jitter=2, test_jitter=5, seed=104),
    },
    'hard': {  # small sets for a tiny model: fewer trials, more noise, more jitter at test time
        'noise 1.0, 8 trials': dict(EXTERNAL, sentences=6, channels=16, word_len=12, min_words=2, max_words=3,
                                    noise=1.0, jitter=3, per_sentence=(8, 2, 4), seed=201),
        'test jitter 3 > 1': dict(EXTERNAL, sentences=6, channels=16, word_len=12, min_words=2, max_words=3,
                                  noise=0.8, jitter=1, test_jitter=3, per_sentence=(8, 2, 4), seed=202),
    },
}


def evaluate(model_dir, name, settings, root, flags):
    data_dir, run_dir = os.path.join(root, 'data'), os.path.join(root, 'run')
    sentences = make_demo_set(data_dir, **settings)
    started = time.perf_counter()
    if main(['finetune', '--model', model_dir, '--bci-data', data_dir, '--out', run_dir, *flags]) != 0:
        raise SystemExit(f'{name}: training failed')
    minutes = (time.perf_counter() - started) / 60
    rows = [json.loads(line) for line in open(os.path.join(run_dir, 'metrics.jsonl'))]
    data, tokenizer = read_data(data_dir), load_tokenizer(model_dir)
    indices = data.indices('test')
    references = [data.texts[i] for i in indices]
    model = load_decoder(model_dir, run_dir, offload='ram')
    free = decode_trials(model, data, tokenizer, indices, 32)
    ranked = rank_candidates(model, data, tokenizer, indices, sentences)
    return {'setting': name, 'seed': settings['seed'], 'steps': rows[-1]['step'], 'train_minutes': round(minutes, 2),
            'steps_per_s': round(len(rows) / sum(r['step_s'] for r in rows), 4),
            'best_step': max((r for r in rows if 'score' in r), default={},  # ties: the lower eval loss, as best/
                             key=lambda r: (r['score'], -r.get('eval_loss', 0.0))).get('step'),
            'test_trials': len(indices), 'free_exact': exact_match(free, references),
            'free_wer': word_error_rate(free, references), 'candidates_exact': exact_match(ranked, references),
            'centroid_exact': exact_match(nearest_centroid(data, indices), references)}


def run(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[2], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument('--model', required=True, help='prepared model folder')
    p.add_argument('--settings', choices=sorted(SETTINGS), default='target', help='which sets (default target)')
    p.add_argument('--only', default=None, help='run only the settings whose name contains this')
    p.add_argument('--out', default=None, help='folder for the sets and runs (default: a temporary one)')
    p.add_argument('flags', nargs='*', help='finetune flags after --, e.g. -- --iters 200 --offload ram')
    args = p.parse_args(argv)
    root = args.out or tempfile.mkdtemp(prefix='bci_eval_')
    results = []
    for name, settings in SETTINGS[args.settings].items():
        if args.only and args.only not in name:
            continue
        result = evaluate(args.model, name, settings, os.path.join(root, name.replace(' ', '_').replace(',', '')),
                          args.flags)
        results.append(result)
        print(f"{name} (seed {result['seed']}): free {result['free_exact']:.3f} (WER {result['free_wer']:.3f}), "
              f"candidates {result['candidates_exact']:.3f}, nearest centroid {result['centroid_exact']:.3f}; "
              f"{result['steps']} steps in {result['train_minutes']:.1f} min ({result['steps_per_s']:.3f} steps/s), "
              f"best at step {result['best_step']}", flush=True)
    print(json.dumps(results, indent=1))
    return 0


if __name__ == '__main__':
    sys.exit(run())
