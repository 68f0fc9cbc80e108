"""A writer run over and over, to be killed at a random point (test_kill.py).

    python tests/writers.py prepare SRC OUT            # prepare SRC into OUT, fp32 and bf16 in turn
    python tests/writers.py export MODEL ADAPTER OUT FORMAT   # with and without the adapter in turn
    python tests/writers.py adapter MODEL OUT          # save_adapter of two different adapters in turn
    python tests/writers.py checkpoint MODEL DATA RUN  # finetune saving a checkpoint every step

Prints 'ready' once its imports are done, then writes until it is killed."""
import os
import sys


def states(writer, args):
    """The two complete states the destination alternates between, as zero-argument writes."""
    import slowllama
    if writer == 'prepare':
        src, out = args
        return [lambda: slowllama.prepare(src, out, dtype='fp32'), lambda: slowllama.prepare(src, out, dtype='bf16')]
    if writer == 'export':
        from slowllama.weights.formats.export import export
        model, adapter, out, fmt = args
        other = None if fmt != 'peft' else adapter + '_other'
        return [lambda: export(model, out, fmt, adapter=adapter), lambda: export(model, out, fmt, adapter=other)]
    if writer == 'adapter':
        model_dir, out = args
        return [lambda: _adapter(model_dir, 1).save_adapter(out), lambda: _adapter(model_dir, 2).save_adapter(out)]
    raise SystemExit(f'unknown writer {writer}')


def _adapter(model_dir, seed, cache={}):
    """A loaded model whose LoRA weights depend on `seed` (loaded once per seed)."""
    if seed not in cache:
        import torch

        import slowllama
        torch.manual_seed(seed)
        model = slowllama.load(model_dir, lora=slowllama.LoraConfig(rank=2 * seed, alpha=4.0, targets=('q', 'v')))
        with torch.no_grad():
            for p in model.trainable_parameters().values():
                p.normal_(0, 0.05)
        cache[seed] = model
    return cache[seed]


def main(writer, *args):
    if writer == 'checkpoint':
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from fuzz import run_finetune
        model, data, run = args
        print('ready', flush=True)
        run_finetune(model, data, run, 100_000, '--resume')  # the run killed before goes on
        return
    writes = states(writer, args)
    writes[0]()  # imports and first loads done before the kill window opens
    print('ready', flush=True)
    n = 1
    while True:
        writes[n % 2]()
        n += 1


if __name__ == '__main__':
    main(*sys.argv[1:])
