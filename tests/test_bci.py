"""The BCI encoder head: gradients through the streamed decoder against whole-model autograd, saving
and loading (adapter + encoder, merged decoder + encoder), refused data, and an end-to-end run on the
synthetic set."""
import copy
import json
import time

import numpy as np
import pytest
import torch
from conftest import random_batch
from reference import copy_adapters, masked_mean_ce, randomize_adapters, whole_model

import slowllama
from slowllama.bci.data import channel_stats, default_splits, read_data
from slowllama.bci.decode import decode_trials, edit_distance, load_decoder, word_error_rate
from slowllama.bci.encoder import (
    ENCODER_CONFIG,
    ENCODER_WEIGHTS,
    EncoderConfig,
    SignalEncoder,
    attach_encoder,
    load_encoder,
    prefix_embeddings,
)
from slowllama.bci.synthetic import make_demo_set
from slowllama.cli import main
from slowllama.model.block import rope_table
from slowllama.tokenizer.tokenizer import load_tokenizer

ALL_TARGETS = ('q', 'k', 'v', 'o', 'gate', 'up', 'down')


def small_encoder(dim, dropout=0.1, prompt='', seed=0):
    torch.manual_seed(seed)
    cfg = EncoderConfig(channels=5, time=30, out_dim=dim, d_enc=32, layers=2, heads=4, patch=6, stride=4,
                        dropout=dropout, prompt=prompt)
    mean, std = torch.randn(5), torch.rand(5) + 0.5
    return SignalEncoder(cfg, mean, std)


def reference_forward(model, prefix, tokens):
    """The whole model in memory over torch.cat([prefix, embeddings]): logits of the token positions."""
    x = torch.cat([prefix, model.embed_tokens(tokens)], dim=1)
    cos, sin = rope_table(model.cfg, torch.arange(x.shape[1]), x.device)
    for layer in model.layers:
        x = layer(x, cos, sin)
    return model.head(x)[:, prefix.shape[1]:]


def max_rel_diff(ours, ref):
    return ((ours - ref).abs().max() / ref.abs().max().clamp(min=1e-12)).item()


def prefix_run_beside_whole_model(model_dir, lora, **load):
    """One prompt + encoder prefix + tokens step through the streamed decoder and through autograd over
    the whole model (dropout 0.1, same seed) -> (streamed, the reference's adapters, loss, reference
    loss, the encoder gradients' worst relative difference; each reference gradient asserted nonzero)."""
    streamed = slowllama.load(model_dir, lora=lora, dropout=0.1, **load)
    randomize_adapters(streamed.adapters)
    encoder = attach_encoder(streamed, small_encoder(streamed.cfg.dim))
    reference, ref_adapters = whole_model(model_dir, lora, dropout=0.1)
    copy_adapters(streamed.adapters, ref_adapters)
    ref_encoder = copy.deepcopy(encoder)
    tokens, targets = random_batch(streamed.cfg.vocab_size, seq=9)
    signals = torch.randn(2, 5, 30) * 3 + 1
    prompt = [5, 6, 7]

    torch.manual_seed(123)
    loss = streamed.backward(tokens, targets, prefix=prefix_embeddings(streamed, encoder, signals, prompt))
    torch.manual_seed(123)
    reference.train()
    fixed = reference.embed_tokens(torch.tensor([prompt])).expand(2, -1, -1)
    ref_prefix = torch.cat([fixed, ref_encoder(signals)], dim=1)
    ref_loss = masked_mean_ce(reference_forward(reference, ref_prefix, tokens), targets)
    ref_loss.backward()

    assert abs(loss - ref_loss.item()) < 1e-5
    ref_encoder_params = dict(ref_encoder.named_parameters())
    encoder_worst = 0.0
    for name, param in encoder.named_parameters():
        want = ref_encoder_params[name].grad
        assert want.abs().max() > 0, name
        encoder_worst = max(encoder_worst, max_rel_diff(param.grad, want))
    return streamed, ref_adapters, loss, ref_loss, encoder_worst


def test_encoder_gradient_through_streamed_decoder_equals_whole_model_autograd(tiny_prepared):
    """Prompt + encoder prefix + tokens; dropout 0.1 in the blocks, the LoRA and the encoder, same seed:
    the same loss, encoder gradients and LoRA gradients as autograd over the whole model."""
    model_dir, _, _ = tiny_prepared
    lora = slowllama.LoraConfig(rank=4, alpha=8.0, dropout=0.1, targets=ALL_TARGETS)
    streamed, ref_adapters, loss, ref_loss, encoder_worst = prefix_run_beside_whole_model(model_dir, lora)
    lora_worst = max(max_rel_diff(getattr(ours[path], m).weight.grad, getattr(ref[path], m).weight.grad)
                     for ours, ref in zip(streamed.adapters, ref_adapters) for path in ours
                     for m in ('lora_A', 'lora_B'))
    print(f'\nloss diff {abs(loss - ref_loss.item()):.2e}, max relative grad diff: encoder {encoder_worst:.2e}, '
          f'LoRA {lora_worst:.2e}')
    assert encoder_worst < 1e-4 and lora_worst < 1e-5


def test_encoder_parameters_are_trainable_parameters(tiny_prepared):
    model_dir, _, _ = tiny_prepared
    model = slowllama.load(model_dir)
    lora_names = set(model.trainable_parameters())
    encoder = attach_encoder(model, small_encoder(model.cfg.dim))
    params = model.trainable_parameters()
    encoder_names = {n for n in params if n.startswith('encoder.')}
    assert set(params) == lora_names | encoder_names
    assert encoder_names == {f'encoder.{n}' for n, _ in encoder.named_parameters()}
    assert params['encoder.projection.weight'] is encoder.projection.weight
    with pytest.raises(slowllama.SlowLlamaError, match='projects to'):
        attach_encoder(model, small_encoder(model.cfg.dim + 1))


def test_save_and_load_adapter_and_encoder(tiny_prepared, tmp_path):
    """save_adapter writes the PEFT adapter and the encoder; loading both gives the same prefix and logits."""
    model_dir, _, _ = tiny_prepared
    model = slowllama.load(model_dir, lora=slowllama.LoraConfig(rank=4, targets=('q', 'v')))
    randomize_adapters(model.adapters)
    encoder = attach_encoder(model, small_encoder(model.cfg.dim, prompt='hi'))
    model.save_adapter(tmp_path / 'adapter')
    assert {p.name for p in (tmp_path / 'adapter').iterdir()} == {
        'adapter_config.json', 'adapter_model.safetensors', ENCODER_WEIGHTS, ENCODER_CONFIG}
    saved = json.loads((tmp_path / 'adapter' / ENCODER_CONFIG).read_text())
    assert saved['prompt'] == 'hi' and np.allclose(saved['channel_mean'], encoder.channel_mean.numpy())

    loaded = load_decoder(model_dir, run=tmp_path / 'adapter')
    again = loaded.attached['encoder']
    assert again.cfg == encoder.cfg
    for name, value in encoder.state_dict().items():
        assert torch.equal(value, again.state_dict()[name]), name
    encoder.eval(), again.eval()
    signals, tokens = torch.randn(2, 5, 30), torch.randint(0, model.cfg.vocab_size, (2, 4))
    assert torch.equal(model.logits(tokens, prefix=encoder(signals)), loaded.logits(tokens, prefix=again(signals)))
    with pytest.raises(slowllama.SlowLlamaError, match='encoder_config.json'):
        load_encoder(tmp_path)


def test_channel_stats_and_default_split(tmp_path):
    signals = np.random.default_rng(0).normal(2.0, 3.0, size=(50, 3, 40)).astype(np.float32)
    mean, std = channel_stats(signals, list(range(40)))
    assert np.allclose(mean.numpy(), signals[:40].mean(axis=(0, 2)), atol=1e-5)
    assert np.allclose(std.numpy(), signals[:40].std(axis=(0, 2)), atol=1e-4)
    splits = default_splits(50)
    assert splits == default_splits(50) and (splits.count('val'), splits.count('test')) == (5, 5)
    assert edit_distance('a b c'.split(), 'a c d'.split()) == 2
    assert word_error_rate(['a b', 'x'], ['a c', 'x']) == pytest.approx(1 / 3)


def write_set(folder, signals, lines):
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / 'signals.npy', signals)
    (folder / 'texts.jsonl').write_text(''.join(json.dumps(line) + '\n' for line in lines))
    return folder


@pytest.mark.parametrize('case, message', [
    ('rank', r'signals\.npy: shape \(4, 30\), expected \[trials, channels, time\]'),
    ('nan', r'signals\.npy: trial 2 holds NaN'),
    ('count', r'texts\.jsonl: 3 lines, but signals\.npy holds 4 trials'),
    ('dtype', r'signals\.npy: dtype float64, expected float32'),
    ('split', r'texts\.jsonl: line 2 has no "split"'),
    ('text', r'texts\.jsonl: line 3 needs a "text" string'),
])
def test_bad_data_is_refused(tmp_path, case, message):
    signals = np.zeros((4, 2, 30), dtype=np.float32)
    lines = [{'text': f'word {i}'} for i in range(4)]
    if case == 'rank':
        signals = signals[:, 0]
    elif case == 'nan':
        signals[2, 1, 7] = np.nan
    elif case == 'count':
        lines = lines[:3]
    elif case == 'dtype':
        signals = signals.astype(np.float64)
    elif case == 'split':
        lines[0]['split'] = 'train'
    elif case == 'text':
        lines[2] = {'sentence': 'no text key'}
    folder = write_set(tmp_path / case, signals, lines)
    with pytest.raises(slowllama.SlowLlamaError, match=message):
        read_data(folder)


def test_bad_data_is_one_line_from_the_cli(tiny_text_model, tmp_path, capsys):
    model_dir, _, _ = tiny_text_model
    folder = write_set(tmp_path / 'bad', np.zeros((3, 2, 8), dtype=np.float32), [{'text': 'a'}] * 2)
    assert main(['finetune', '--model', str(model_dir), '--bci-data', str(folder), '--out', str(tmp_path / 'r')]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count('\n') == 0 and 'texts.jsonl: 2 lines' in err
    assert not (tmp_path / 'r' / 'checkpoints').exists()


def demo_run(model_dir, data, out, iters, extra=()):
    return main(['finetune', '--model', str(model_dir), '--bci-data', str(data), '--out', str(out),
                 '--iters', str(iters), '--lr', '3e-3', '--bci-d-enc', '64', '--bci-patch', '8', '--bci-stride', '4',
                 '--eval-every', '50', '--bci-decode-trials', '4', '--bci-pretrain', '200', *extra])


def tiny_demo_set(folder):
    return make_demo_set(folder, trials=200, sentences=6, channels=16, word_len=8, max_words=3, noise=0.3)


def test_resume_continues_the_encoder_exactly(tiny_text_model, tmp_path):
    """Encoder and LoRA live in the checkpoints: a run stopped at step 2 and resumed ends where an
    uninterrupted run ends."""
    from slowllama.weights.files import SafetensorsFile
    model_dir, _, _ = tiny_text_model
    tiny_demo_set(tmp_path / 'data')
    assert demo_run(model_dir, tmp_path / 'data', tmp_path / 'whole', 4, ['--save-every', '2']) == 0
    assert demo_run(model_dir, tmp_path / 'data', tmp_path / 'part', 2, ['--save-every', '2']) == 0
    assert demo_run(model_dir, tmp_path / 'data', tmp_path / 'part', 4, ['--save-every', '2', '--resume']) == 0
    last = 'checkpoints/step_000004/trainable.safetensors'
    whole, part = SafetensorsFile(tmp_path / 'whole' / last), SafetensorsFile(tmp_path / 'part' / last)
    assert any(n.startswith('encoder.') for n in whole.names())
    for name in whole.names():
        assert torch.equal(whole.tensor(name), part.tensor(name)), name


@pytest.mark.slow
def test_end_to_end_synthetic_set_decodes_held_out_trials(tiny_text_model, tmp_path, capsys):
    """make_bci_demo -> finetune --bci-data -> bci_decode: held-out trials decoded to their sentences."""
    model_dir, _, _ = tiny_text_model
    data, run = tmp_path / 'data', tmp_path / 'run'
    tiny_demo_set(data)
    started = time.perf_counter()
    assert demo_run(model_dir, data, run, 200) == 0
    minutes = (time.perf_counter() - started) / 60
    capsys.readouterr()
    preds = tmp_path / 'preds.jsonl'
    assert main(['bci_decode', '--model', str(model_dir), '--run', str(run), '--bci-data', str(data),
                 '--split', 'test', '--out', str(preds)]) == 0
    scores = next(line for line in capsys.readouterr().out.splitlines() if 'free decoding' in line)
    print(f'\n{scores} after {minutes:.2f} min of training')
    rows = [json.loads(line) for line in preds.read_text().splitlines()]
    dataset = read_data(data)
    assert [r['index'] for r in rows] == dataset.indices('test')
    exact = np.mean([r['text'] == dataset.texts[r['index']] for r in rows])
    assert exact >= 0.95, scores


def test_merged_decoder_with_encoder_decodes_like_adapter_and_encoder(tiny_text_model, tmp_path):
    """A decoder with the LoRA merged in (export --format hf, then prepare) plus the encoder decodes
    what the base + adapter + encoder decode."""
    from slowllama.weights.formats.export import export
    model_dir, _, _ = tiny_text_model
    data = tmp_path / 'data'
    tiny_demo_set(data)
    model = slowllama.load(model_dir, lora=slowllama.LoraConfig(rank=4, targets=('q', 'k', 'v', 'o')))
    randomize_adapters(model.adapters, scale=0.3)
    dataset = read_data(data)
    cfg = EncoderConfig(channels=dataset.channels, time=dataset.time, out_dim=model.cfg.dim, d_enc=32, patch=4,
                        start_token=1)
    attach_encoder(model, SignalEncoder(cfg, *channel_stats(dataset.signals, dataset.indices('train'))))
    model.save_adapter(tmp_path / 'adapter')

    merged_hf = tmp_path / 'merged_hf'  # what scripts/export.py --format hf writes
    export(model_dir, merged_hf, 'hf', adapter=tmp_path / 'adapter', dtype='fp32')
    slowllama.prepare(merged_hf, tmp_path / 'merged', dtype='fp32')

    tokenizer = load_tokenizer(model_dir)
    indices = dataset.indices('test')[:4]
    with_adapter = decode_trials(load_decoder(model_dir, run=tmp_path / 'adapter'), dataset, tokenizer, indices, 6)
    merged = decode_trials(load_decoder(tmp_path / 'merged', encoder_dir=tmp_path / 'adapter'), dataset,
                           tokenizer, indices, 6)
    assert merged == with_adapter and any(with_adapter)


def test_continue_from_a_saved_adapter_and_encoder(tiny_text_model, tmp_path):
    """finetune --bci-data --adapter DIR starts from that folder's LoRA and encoder (not new ones)."""
    from slowllama.bci.train import build
    from slowllama.cli import build_parser
    from slowllama.recipes.options import resolve
    model_dir, _, _ = tiny_text_model
    tiny_demo_set(tmp_path / 'data')
    dataset = read_data(tmp_path / 'data')
    model = slowllama.load(model_dir, lora=slowllama.LoraConfig(rank=4, targets=('q', 'v')))
    randomize_adapters(model.adapters)
    cfg = EncoderConfig(channels=dataset.channels, time=dataset.time, out_dim=model.cfg.dim, d_enc=32, patch=4)
    saved = attach_encoder(model, SignalEncoder(cfg, *channel_stats(dataset.signals, dataset.indices('train'))))
    model.save_adapter(tmp_path / 'adapter')
    args = build_parser().parse_args(['finetune', '--model', str(model_dir), '--bci-data', str(tmp_path / 'data'),
                                      '--adapter', str(tmp_path / 'adapter'), '--out', str(tmp_path / 'run')])
    again, _, _ = build(resolve(args))
    params, want = again.trainable_parameters(), model.trainable_parameters()
    assert set(params) == set(want)
    for name in want:
        assert torch.equal(params[name].cpu(), want[name].cpu()), name
    assert again.attached['encoder'].cfg == saved.cfg


def test_batch_rows_keep_their_signals():
    """A data-parallel share of a batch (Trainer under torchrun) keeps each row's signal with its text."""
    from slowllama.bci.data import TrialBatch
    batch = TrialBatch(torch.arange(8).view(4, 2), torch.arange(8).view(4, 2), torch.arange(4.0).view(4, 1, 1))
    share = batch.rows(slice(2, 4))
    assert isinstance(share, TrialBatch) and share.signals.flatten().tolist() == [2.0, 3.0]
    assert share.tokens.tolist() == [[4, 5], [6, 7]] and share.n_targets == 4


def test_decode_needs_run_or_encoder(tiny_text_model, tmp_path, capsys):
    model_dir, _, _ = tiny_text_model
    tiny_demo_set(tmp_path / 'data')
    assert main(['bci_decode', '--model', str(model_dir), '--bci-data', str(tmp_path / 'data')]) == 2
    assert 'give --run RUN' in capsys.readouterr().err
    assert main(['bci_decode', '--model', str(model_dir), '--bci-data', str(tmp_path / 'data'),
                 '--encoder', str(tmp_path)]) == 2
    assert 'no BCI encoder here' in capsys.readouterr().err
