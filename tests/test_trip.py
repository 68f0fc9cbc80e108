"""The step's schedule (engine/trip.py): the micro-batches of an optimizer step travel through each
block together. Against the accumulation before it (each micro-batch's backward alone, its gradient
weighted and summed in order): the same bits at dropout 0, for plain text, DPO pairs, a BCI prefix,
packed documents, Mistral's window and quantized blocks; with dropout, each micro-batch as it would
run alone from the RNG state its stream gives it; and each block fetched twice a trip."""
import os
import signal
import subprocess
import sys

import pytest
import torch
from conftest import make_hf_model, random_batch
from reference import copy_adapters, randomize_adapters

import slowllama
from slowllama.engine.devices import set_rng_state
from slowllama.engine.trip import MicroBatch, rng_streams
from slowllama.errors import SlowLlamaError
from slowllama.weights.prepared import block_file

HERE = os.path.dirname(os.path.abspath(__file__))
LORA = slowllama.LoraConfig(rank=4, alpha=8.0, targets=('q', 'v', 'o', 'down'))
SHARES = [0.1, 0.4, 0.2, 0.3]


def micro_batches(vocab, count=4, seq=12, packed=False):
    batches = []
    for k in range(count):
        tokens, targets = random_batch(vocab, seq=seq, seed=20 + k)
        positions = torch.cat([torch.arange(5), torch.arange(seq - 5)]).repeat(2, 1) if packed else None
        batches.append(MicroBatch(tokens, targets, positions=positions))
    return batches


def twins(model_dir, dropout=0.0, lora=LORA, **options):
    """Two models with the same random adapters."""
    first = slowllama.load(model_dir, lora=lora, dropout=dropout, **options)
    second = slowllama.load(model_dir, lora=lora, dropout=dropout, **options)
    randomize_adapters(first.adapters, seed=5)
    copy_adapters(first.adapters, second.adapters)
    return first, second


def sequential(model, batches, shares):
    """The accumulation before trips (the trainer's loop): each micro-batch's backward alone, then
    its gradients weighted by its share and summed in order."""
    params = model.trainable_parameters()
    summed = {name: torch.zeros_like(p) for name, p in params.items()}
    losses = []
    for batch, share in zip(batches, shares):
        for p in params.values():
            p.grad = None
        losses.append(model.backward(batch.tokens, batch.targets, prefix=batch.prefix, positions=batch.positions,
                                     weigh=batch.weigh))
        for name, p in params.items():
            if p.grad is not None:
                summed[name].add_(p.grad, alpha=share)
    return losses, summed


def accumulated(model, batches, shares):
    params = model.trainable_parameters()
    for p in params.values():
        p.grad = None
    losses = model.accumulate(batches, shares)
    return losses, {name: p.grad if p.grad is not None else torch.zeros_like(p) for name, p in params.items()}


def assert_bit_identical(first, second):
    (losses_a, grads_a), (losses_b, grads_b) = first, second
    assert losses_a == losses_b
    assert grads_a.keys() == grads_b.keys()
    differing = [name for name in grads_a if not torch.equal(grads_a[name], grads_b[name])]
    assert not differing, differing[:5]
    assert any(g.abs().max() > 0 for g in grads_a.values())


@pytest.mark.parametrize('trip', [None, 2, 1])
def test_trips_equal_the_sequential_accumulation_bit_for_bit(tiny_text_model, trip):
    model_dir, _, _ = tiny_text_model
    ours, before = twins(model_dir, micro_batches_per_trip=trip)
    batches = micro_batches(ours.cfg.vocab_size)
    got = accumulated(ours, batches, SHARES)
    assert ours.step_plan.trip == (trip or 4)
    assert_bit_identical(got, sequential(before, batches, SHARES))


def test_with_dropout_each_micro_batch_runs_as_alone_from_its_stream(tiny_text_model):
    """Model and LoRA dropout 0.1: the step equals the micro-batches run one after another, each
    from the RNG state rng_streams gives it; one trip of four equals four trips of one; the global
    RNG ends as after micro-batch 0's forward."""
    model_dir, _, _ = tiny_text_model
    lora = slowllama.LoraConfig(rank=4, alpha=8.0, dropout=0.1, targets=('q', 'v', 'o', 'down'))
    together, alone = twins(model_dir, dropout=0.1, lora=lora)
    batches = micro_batches(together.cfg.vocab_size)
    torch.manual_seed(7)
    got = accumulated(together, batches, SHARES)
    after = torch.get_rng_state()

    torch.manual_seed(7)
    streams = rng_streams(torch.device('cpu'), len(batches))
    params = alone.trainable_parameters()
    summed = {name: torch.zeros_like(p) for name, p in params.items()}
    losses = []
    for k, (batch, share) in enumerate(zip(batches, SHARES)):
        for p in params.values():
            p.grad = None
        set_rng_state(torch.device('cpu'), streams[k])
        losses.append(alone.backward(batch.tokens, batch.targets))
        if k == 0:
            after_first = torch.get_rng_state()
        for name, p in params.items():
            summed[name].add_(p.grad, alpha=share)
    assert_bit_identical(got, (losses, summed))
    assert torch.equal(after, after_first)
    assert len(set(losses)) == len(losses)

    single = slowllama.load(model_dir, lora=lora, dropout=0.1, micro_batches_per_trip=1)
    randomize_adapters(single.adapters, seed=5)
    torch.manual_seed(7)
    assert_bit_identical(got, accumulated(single, batches, SHARES))


def test_the_streams_differ_and_do_not_depend_on_the_trip(tiny_text_model):
    torch.manual_seed(3)
    first = rng_streams(torch.device('cpu'), 3)
    torch.manual_seed(3)
    again = rng_streams(torch.device('cpu'), 3)
    assert all(torch.equal(a['cpu'], b['cpu']) for a, b in zip(first, again))
    assert not torch.equal(first[1]['cpu'], first[2]['cpu']) and not torch.equal(first[0]['cpu'], first[1]['cpu'])
    torch.manual_seed(3)
    assert torch.equal(rng_streams(torch.device('cpu'), 1)[0]['cpu'], torch.get_rng_state())  # one: untouched


@pytest.mark.parametrize('trip', [None, 1])
def test_each_block_crosses_twice_a_trip(tiny_text_model, trip):
    """Four micro-batches from disk: the store fetches each block once for the forward and once for
    the backward of a trip (the last two stay between them), and counts the bytes it read: every
    fetched block file, each micro-batch's embedding rows, and the head once a trip."""
    model_dir, _, _ = tiny_text_model
    model = slowllama.load(model_dir, lora=LORA, offload='disk', micro_batches_per_trip=trip)
    fetched = []
    real_fetch = model.store._fetch
    model.store._fetch = lambda i: fetched.append(i) or real_fetch(i)
    batches = micro_batches(model.cfg.vocab_size)
    before = model.traffic()
    model.accumulate(batches, SHARES)
    trips, n = (1 if trip is None else 4), model.cfg.n_layers
    per_trip = list(range(n)) + list(reversed(range(n - 2)))
    assert fetched == per_trip * trips
    block = sum(t.nbytes for t in model.store._file(block_file(0)).tensors().values())
    tokens = sum(b.tokens.numel() for b in batches)
    head = model.cfg.vocab_size * model.cfg.dim * 4
    want = len(fetched) * block + tokens * model.cfg.dim * 4 + trips * head
    assert model.traffic()['bytes_read'] - before['bytes_read'] == want
    assert model.traffic()['bytes_to_device'] == 0  # a cpu: nothing crosses


def test_trainer_logs_the_bytes_of_each_step(tiny_text_model, tmp_path):
    import json

    from slowllama.data.dataset import load_data
    from slowllama.tokenizer.tokenizer import load_tokenizer
    from slowllama.training.trainer import TrainConfig, Trainer
    model_dir, _, _ = tiny_text_model
    (tmp_path / 'text.txt').write_text(' '.join(['the quick brown fox jumps over the lazy dog'] * 40))
    data = load_data(tmp_path / 'text.txt', load_tokenizer(model_dir), 16, 2)
    model = slowllama.load(model_dir, lora=LORA, offload='disk')
    Trainer(model, TrainConfig(iters=2, grad_accum=3), tmp_path / 'run', data.train).run()
    rows = [json.loads(line) for line in (tmp_path / 'run' / 'metrics.jsonl').read_text().splitlines()]
    block = sum(t.nbytes for t in model.store._file(block_file(0)).tensors().values())
    for row in rows:
        assert row['bytes_read'] >= (2 * model.cfg.n_layers - 2) * block
        assert row['bytes_read'] < (2 * model.cfg.n_layers) * block + 2 * model.cfg.vocab_size * model.cfg.dim * 4
        assert row['bytes_to_device'] == 0 and row['read_bytes_per_s'] > 0
    assert 'MB/s read' in (tmp_path / 'run' / 'train.log').read_text()


# --- the objectives and models beside plain text: each equal to its sequential twin ---------------

def dpo_batches(model, count=3):
    from slowllama.data.preference import collate_pairs, make_pair
    from slowllama.training.dpo import train_step
    g = torch.Generator().manual_seed(9)
    ids = lambda n: torch.randint(4, 120, (n,), generator=g).tolist()  # noqa: E731
    batches = []
    for _ in range(count):
        pairs = [make_pair(p, p + ids(4), p + ids(6), seq_len=24) for p in (ids(3), ids(5))]
        for pair in pairs:
            pair.reference = (-30.0, -35.0)
        batches.append(train_step(model, collate_pairs(pairs, pad_id=3), beta=0.2))
    return batches


def test_dpo_pairs_equal_their_sequential_twin(tiny_text_model):
    model_dir, _, _ = tiny_text_model
    ours, before = twins(model_dir)
    shares = [0.5, 0.25, 0.25]
    got = accumulated(ours, dpo_batches(ours), shares)
    assert_bit_identical(got, sequential(before, dpo_batches(before), shares))


def test_the_bci_prefix_and_encoder_equal_their_sequential_twin(tiny_text_model):
    from test_bci import small_encoder

    from slowllama.bci.encoder import attach_encoder, prefix_embeddings
    model_dir, _, _ = tiny_text_model
    ours, before = twins(model_dir)
    encoders = [attach_encoder(m, small_encoder(m.cfg.dim, dropout=0.0)) for m in (ours, before)]
    encoders[1].load_state_dict(encoders[0].state_dict())
    signals = [torch.randn(2, 5, 30, generator=torch.Generator().manual_seed(k)) for k in range(3)]

    def batches(model, encoder):
        return [MicroBatch(b.tokens, b.targets, prefix=prefix_embeddings(model, encoder, s, [5, 6]))
                for b, s in zip(micro_batches(model.cfg.vocab_size, 3, seq=8), signals)]
    shares = [0.3, 0.3, 0.4]
    got = accumulated(ours, batches(ours, encoders[0]), shares)
    want = sequential(before, batches(before, encoders[1]), shares)
    assert_bit_identical(got, want)
    assert any(name.startswith('encoder.') and g.abs().max() > 0 for name, g in got[1].items())


def test_packed_documents_equal_their_sequential_twin(tiny_text_model):
    model_dir, _, _ = tiny_text_model
    ours, before = twins(model_dir)
    batches = micro_batches(ours.cfg.vocab_size, packed=True)
    assert_bit_identical(accumulated(ours, batches, SHARES), sequential(before, batches, SHARES))


@pytest.fixture(scope='module')
def mistral_and_nf4(tmp_path_factory):
    folder = tmp_path_factory.mktemp('trip_models')
    make_hf_model(folder / 'mistral', seed=11, model_type='mistral', num_attention_heads=6, num_key_value_heads=3,
                  hidden_size=72, sliding_window=5)
    slowllama.prepare(folder / 'mistral', folder / 'mistral-prepared', dtype='fp32')
    make_hf_model(folder / 'llama', seed=4, intermediate_size=128)
    slowllama.prepare(folder / 'llama', folder / 'nf4', dtype='fp32', quant='nf4')
    return {'mistral': folder / 'mistral-prepared', 'nf4': folder / 'nf4'}


@pytest.mark.parametrize('kind', ['mistral', 'nf4'])
def test_mistral_window_and_quantized_blocks_equal_their_sequential_twin(mistral_and_nf4, kind):
    ours, before = twins(mistral_and_nf4[kind], offload='disk')
    batches = micro_batches(ours.cfg.vocab_size)
    assert_bit_identical(accumulated(ours, batches, SHARES), sequential(before, batches, SHARES))


# --- memory, budgets and bad input -----------------------------------------------------------

def test_saved_inputs_spill_to_disk_and_come_back_the_same(tiny_text_model):
    model_dir, _, _ = tiny_text_model
    spilled, kept = twins(model_dir, dropout=0.1, stash_ram_bytes=0, keep_activations='none')
    batches = micro_batches(spilled.cfg.vocab_size)
    torch.manual_seed(1)
    first = accumulated(spilled, batches, SHARES)
    torch.manual_seed(1)
    assert_bit_identical(first, accumulated(kept, batches, SHARES))


def test_a_spill_folder_that_cannot_be_written_is_named(tiny_text_model, tmp_path, monkeypatch):
    import tempfile
    model_dir, _, _ = tiny_text_model
    model = slowllama.load(model_dir, lora=LORA, stash_ram_bytes=0, keep_activations='none')
    (tmp_path / 'a-file').write_text('not a folder')
    monkeypatch.setattr(tempfile, 'tempdir', str(tmp_path / 'a-file' / 'tmp'))  # no one can make folders there
    with pytest.raises(SlowLlamaError, match='a-file/tmp: cannot make a folder for the saved block inputs'):
        model.accumulate(micro_batches(model.cfg.vocab_size, 2), [0.5, 0.5])
    assert not model.store._held and not model.store._pending


def test_a_full_spill_disk_is_one_line_naming_the_folder(tiny_text_model, monkeypatch):
    import slowllama.engine.stash as stash_module
    model_dir, _, _ = tiny_text_model
    model = slowllama.load(model_dir, lora=LORA, stash_ram_bytes=0, keep_activations='none')

    def full(tensors, path):
        raise OSError(28, 'No space left on device')
    monkeypatch.setattr(stash_module, 'save_file', full)
    with pytest.raises(SlowLlamaError, match='slowllama-inputs-.*cannot spill the saved block inputs there'):
        model.accumulate(micro_batches(model.cfg.vocab_size, 2), [0.5, 0.5])


def test_saved_inputs_beyond_memory_and_disk_are_refused_with_the_figures():
    from slowllama.engine.plan import GIB, plan_step
    from slowllama.recipes.shapes import shape_config
    cfg = shape_config('7b')
    with pytest.raises(SlowLlamaError, match=r'^grad_accum 8: the saved inputs .* need \d+\.\d+ GiB'):
        plan_step(cfg, 16, 4096, 'bf16', 8, budget=2 * GIB, ram_budget=1 * GIB, disk_budget=1 * GIB)
    plan = plan_step(cfg, 16, 128, 'bf16', 8, budget=2 * GIB, ram_budget=8 * GIB, disk_budget=100 * GIB)
    assert plan.trip == 8 and plan.trips == 1  # saved inputs spill to RAM and disk rather than a second trip
    tight = plan_step(cfg, 16, 128, 'bf16', 8, budget=int(0.2 * GIB), ram_budget=8 * GIB)
    assert 1 <= tight.trip < 8  # the hidden states of eight do not fit on the device


# --- a kill in the middle of a multi-micro-batch step ------------------------------------------

KILLER = '''
import os, signal, sys
import slowllama.engine.recompute as recompute
calls, real = [0], recompute.block_backward
def block_backward(*args, **kwargs):
    calls[0] += 1
    if calls[0] == int(os.environ['KILL_AT_BLOCK_BACKWARD']):
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*args, **kwargs)
recompute.block_backward = block_backward
from slowllama.cli import main
sys.exit(main(sys.argv[1:]))
'''


def finetune(args, kill_at=None):
    env = {**os.environ, 'PYTHONPATH': os.path.dirname(HERE) + os.pathsep + os.environ.get('PYTHONPATH', ''),
           'KILL_AT_BLOCK_BACKWARD': str(kill_at or 0)}
    return subprocess.run([sys.executable, '-c', KILLER, 'finetune', *args], env=env, capture_output=True, text=True)


@pytest.mark.slow
def test_a_kill_in_the_backward_of_a_multi_micro_batch_step_resumes_to_the_same_adapter(tiny_text_model,
                                                                                        tmp_path):
    model_dir, _, _ = tiny_text_model
    (tmp_path / 'text.txt').write_text(' '.join(['odalys brenn keeps the violet lamp burning every night'] * 30))
    common = ['--model', str(model_dir), '--data', str(tmp_path / 'text.txt'), '--iters', '4', '--batch-size', '2',
              '--seq-len', '16', '--grad-accum', '3', '--lora-rank', '2', '--dropout', '0.1', '--save-every', '1',
              '--val-fraction', '0', '--offload', 'disk', '--device', 'cpu', '--keep-activations', 'none']
    whole = finetune([*common, '--out', str(tmp_path / 'whole')])
    assert whole.returncode == 0, whole.stderr[-2000:]
    n_layers = slowllama.load(model_dir).cfg.n_layers
    # step 3's trip: three micro-batches through each block; killed half-way down its backward
    killed = finetune([*common, '--out', str(tmp_path / 'resumed')], kill_at=2 * 3 * n_layers + 3 * 2 + 1)
    assert killed.returncode == -signal.SIGKILL
    assert sorted(os.listdir(tmp_path / 'resumed' / 'checkpoints')) == ['step_000001', 'step_000002']
    resumed = finetune([*common, '--out', str(tmp_path / 'resumed'), '--resume'])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    read = lambda run: (run / 'adapter' / 'adapter_model.safetensors').read_bytes()  # noqa: E731
    assert read(tmp_path / 'whole') == read(tmp_path / 'resumed')


# --- the step's plan: decided once, at load, from the run's settings -------------------------------

def test_the_step_is_planned_once_at_load_from_its_options(tiny_text_model):
    """EngineOptions declare the step (grad_accum micro-batches of batch_hint): the plan is made at
    load, and the steps of that shape (or of fewer micro-batches) run on it without planning again;
    the keyword offload= of the CONTRACT still places the blocks."""
    model_dir, _, _ = tiny_text_model
    options = slowllama.EngineOptions(offload='disk', grad_accum=3, batch_hint=(2, 16), keep_activations='none')
    model = slowllama.load(model_dir, lora=LORA, dropout=0.1, options=options)
    planned = model.step_plan
    assert planned.micro_batches == 3 and planned.kept_blocks == 0 and model.store.offload == 'disk'
    batches = micro_batches(model.cfg.vocab_size, 3, seq=16)  # of 2 rows
    model.accumulate(batches, [1 / 3] * 3)
    model.accumulate(batches[:2], [0.5, 0.5])  # a micro-batch left out: still the step declared
    assert model.step_plan is planned
    model.backward(*random_batch(model.cfg.vocab_size, batch=1, seq=8))  # a shape never declared: its own plan
    assert model.step_plan is not planned and model.step_plan.micro_batches == 1
    ram = slowllama.load(model_dir, lora=LORA, offload='ram', options=options)  # the keyword wins
    assert ram.store.offload == 'ram' and ram.options.grad_accum == 3


def test_settings_below_the_recipes_are_named_as_settings_and_the_cli_names_flags():
    from slowllama.cli import as_flags
    with pytest.raises(SlowLlamaError, match='^keep_activations: ') as error:
        slowllama.EngineOptions(keep_activations='most')
    assert as_flags(str(error.value)).startswith('--keep-activations: ')
    with pytest.raises(SlowLlamaError, match='^micro_batches_per_trip must be at least 1'):
        slowllama.EngineOptions(micro_batches_per_trip=0)
    assert as_flags('grad_accum 8: lower `batch_size` or `seq_len`') == '--grad-accum 8: lower --batch-size or --seq-len'
    assert as_flags('LoraConfig.rank must be positive') == '--lora-rank must be positive'
    assert as_flags('/runs/a_b: `nothing` here') == '/runs/a_b: `nothing` here'  # a path, an unknown name: as they are
