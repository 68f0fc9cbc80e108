"""The mps path, run on this cpu with a stand-in Apple GPU (tests/standin.py): the real store, copier,
copy queue, stash, engine, attention, sampling and planner take their mps branches, compute as the
cpu does (so a step equals a cpu step bit for bit), and keep the rules a Mac needs (issue 31):
- only the thread that launches the compute touches mps' one queue (MPS encoding is not
  thread-safe): the reader thread fills a staging buffer, the copy is queued when the block is taken;
- a host tensor copied to the device without blocking lives until the copy is known done, and
  copies back to the host block (a non-blocking copy from pageable memory reads it late on mps);
- attention gets contiguous q, k, v (mps' fast kernel read other layouts wrongly in some releases);
- sampling draws on the cpu (multinomial on mps drew tokens of probability 0);
- the planner counts the plain nf4 unpack's temporaries, the unpack mps runs."""
import os
import subprocess
import sys

import pytest
import torch
from reference import randomize_adapters
from standin import OnMps, standin_mps
from test_copier import fail_once, step
from test_packed import prepared, quant_hf  # noqa: F401 (fixtures)

import slowllama
from slowllama.engine.plan import plain_nf4_unpack_bytes, predict
from slowllama.engine.stash import InputStash
from slowllama.model.config import ModelConfig
from slowllama.model.quant import Quant

LORA = slowllama.LoraConfig(rank=4, dropout=0.1, targets=('q', 'v', 'down'))
ONE_INPUT = 2 * 12 * 64 * 4  # random_batch's [2, 12] tokens at dim 64 in fp32
SDPA = torch.nn.functional.scaled_dot_product_attention


def load(model_dir, device, offload, **options):
    model = slowllama.load(model_dir, device=device, lora=LORA, dropout=0.1, dtype='fp32', offload=offload, **options)
    randomize_adapters(model.adapters)
    return model


def plain(tensors):
    return {name: t.as_subclass(torch.Tensor) for name, t in tensors.items()}


def assert_kept_the_mps_rules(standin):
    threads = {thread for _, thread in standin.queue_calls} | {t[3] for t in standin.transfers}
    assert threads <= {'MainThread'}, standin.queue_calls
    assert not [t for t in standin.transfers if t[:3] == ('mps', 'cpu', True)]  # back to the host: blocking
    assert not standin.freed_early
    for func, tensors in standin.calls:
        if func is SDPA:
            assert all(t.is_contiguous() for t in tensors[:3])
        else:  # multinomial
            assert not any(isinstance(t, OnMps) for t in tensors)


@pytest.mark.parametrize('offload, keep', [('disk', 'none'), ('ram', 'none'), ('disk', 'all')])
def test_a_step_on_mps_equals_the_cpus_and_keeps_the_rules(tiny_text_model, monkeypatch, offload, keep):
    """Recomputed blocks: saved inputs beyond the first on the host and on disk (the stash's mps
    branches too); or every block keeping its activations (weights by name, back from the fetch)."""
    model_dir, _, _ = tiny_text_model
    stash = {'stash_device_bytes': ONE_INPUT, 'stash_ram_bytes': ONE_INPUT, 'keep_activations': keep}
    cpu_loss, cpu_grads = step(load(model_dir, 'cpu', offload))
    with standin_mps(monkeypatch) as standin:
        model = load(model_dir, 'mps', offload, **stash)
        assert model.store._copier.queue.one_thread and model.store.device.type == 'mps'
        loss, grads = step(model)
        loss_again, _ = step(model)
    assert loss == loss_again == cpu_loss
    assert all(torch.equal(g, cpu_grads[name]) for name, g in plain(grads).items())
    assert any(t[:3] == ('cpu', 'mps', True) for t in standin.transfers)  # the blocks' copies still overlap
    assert_kept_the_mps_rules(standin)


def test_packed_blocks_unpack_on_mps_to_the_cpus_step(prepared, monkeypatch):
    """nf4 (plain torch kernels on mps, bitsandbytes' on this cpu: the same bits), double quant, int8."""
    model_dir, _ = prepared
    cpu_loss, cpu_grads = step(load(model_dir, 'cpu', 'disk'))
    with standin_mps(monkeypatch) as standin:
        model = load(model_dir, 'mps', 'disk')
        loss, grads = step(model)
    assert loss == cpu_loss and all(torch.equal(g, cpu_grads[name]) for name, g in plain(grads).items())
    assert_kept_the_mps_rules(standin)


def test_generation_on_mps_samples_on_the_cpu(tiny_text_model, monkeypatch):
    model_dir, _, _ = tiny_text_model
    prompt = torch.tensor([[5, 17, 42, 9]])

    def generate(model):
        torch.manual_seed(3)
        sampled = model.generate(prompt, 12, temperature=0.9, top_p=0.8)
        return sampled.as_subclass(torch.Tensor), model.generate(prompt, 12).as_subclass(torch.Tensor)
    expected = generate(load(model_dir, 'cpu', 'disk'))
    with standin_mps(monkeypatch) as standin:
        got = generate(load(model_dir, 'mps', 'disk'))
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    assert [f for f, _ in standin.calls if f is torch.multinomial]
    assert_kept_the_mps_rules(standin)


def test_the_stash_on_mps_keeps_its_sources_until_copied(monkeypatch):
    """Inputs on the device, in host RAM and on disk: copies between host and device block there."""
    inputs = [torch.randn(2, 12, 64) for _ in range(3)]
    with standin_mps(monkeypatch) as standin:
        stash = InputStash(torch.device('mps'), device_bytes=ONE_INPUT, ram_bytes=ONE_INPUT)
        for i, x in enumerate(inputs):
            stash.put(i, x.to('mps'))
        assert [stash.items[i][0] for i in range(3)] == ['device', 'ram', 'disk']
        popped = [stash.pop(i) for i in reversed(range(3))][::-1]
        stash.close()
    assert all(isinstance(x, OnMps) and torch.equal(x, want) for x, want in zip(popped, inputs))
    assert standin.transfers and not any(non_blocking for _, _, non_blocking, _ in standin.transfers)
    assert_kept_the_mps_rules(standin)


@pytest.mark.parametrize('point', ['reader thread', 'wait (Ctrl-C)'])
def test_a_failed_fetch_on_mps_leaves_the_model_usable(tiny_text_model, monkeypatch, point):
    model_dir, _, _ = tiny_text_model
    with standin_mps(monkeypatch) as standin:
        clean = load(model_dir, 'mps', 'disk')  # held: its last copies are not waited for (nor on cuda)
        clean_loss, clean_grads = step(clean)
        model = load(model_dir, 'mps', 'disk')
        assert sum(fail_once(model, monkeypatch, point, at) for at in (1, 4)) == 2
        assert model.store._copier._in_use == [False, False]
        loss, grads = step(model)
    assert loss == clean_loss and all(torch.equal(grads[k], clean_grads[k]) for k in grads)
    assert_kept_the_mps_rules(standin)


# --- the planner ------------------------------------------------------------------------------

LLAMA_7B = ModelConfig(dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, hidden_dim=11008, vocab_size=32000)
NF4 = Quant('nf4')


def test_on_mps_the_plan_counts_the_plain_nf4_unpack(monkeypatch):
    from slowllama.engine import plan as plan_module
    from slowllama.engine.placement import placement
    extra = predict(LLAMA_7B, 4, 128, quant=NF4, plain_unpack=True).device_bytes - predict(
        LLAMA_7B, 4, 128, quant=NF4).device_bytes
    assert extra == plain_nf4_unpack_bytes(LLAMA_7B, 'bf16') == 8 * 11008 * 4096  # down_proj, 344 MiB
    asked = []
    place_blocks = plan_module.place_blocks
    monkeypatch.setattr('slowllama.engine.placement.place_blocks',
                        lambda *a, **kw: asked.append(kw) or place_blocks(*a, **kw))
    monkeypatch.setattr('slowllama.engine.placement.free_device_memory', lambda device: 8 << 30)
    monkeypatch.setattr('slowllama.engine.placement.free_host_memory', lambda: 8 << 30)
    for device in ('mps', 'cuda'):  # only planned, nothing allocated
        placement(LLAMA_7B, torch.device(device), torch.bfloat16, 'auto', 'bf16', quant=NF4)
    assert [kw['plain_unpack'] for kw in asked] == [True, False]


MEASURE = '''
import sys, torch
from slowllama.model.quant import nf4_dequantize, nf4_quantize
from slowllama.weights.host_memory import peak_rss, process_rss, reset_peak_rss
shape, dtype = (4096, 1024), getattr(torch, sys.argv[1])  # down_proj of the cfg below
qweight, absmax = nf4_quantize(torch.randn(shape))
out = torch.zeros(shape, dtype=dtype)
nf4_dequantize(qweight, absmax, shape, out, plain=True)
reset_peak_rss()
before = process_rss()
nf4_dequantize(qweight, absmax, shape, out, plain=True)
print(peak_rss() - before)
'''


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='peak memory is read from /proc')
@pytest.mark.parametrize('dtype', ['bf16', 'fp32'])
def test_the_plain_nf4_unpack_needs_what_the_plan_counts(dtype):
    """Measured on this cpu (the same torch calls mps makes): the unpack's temporaries beside its output."""
    cfg = ModelConfig(dim=1024, n_layers=1, n_heads=8, n_kv_heads=8, hidden_dim=4096, vocab_size=64)
    torch_dtype = {'bf16': 'bfloat16', 'fp32': 'float32'}[dtype]
    env = {**os.environ, 'MALLOC_MMAP_THRESHOLD_': '65536'}  # every big tensor its own mapping, freed at once
    result = subprocess.run([sys.executable, '-c', MEASURE, torch_dtype], env=env, capture_output=True, text=True,
                            check=True)
    measured, planned = int(result.stdout.split()[-1]), plain_nf4_unpack_bytes(cfg, dtype)
    assert 0.9 * planned <= measured <= planned + (1 << 20), (measured, planned)


@pytest.mark.skipif(torch.backends.mps.is_available(), reason='an Apple GPU is here')
def test_device_mps_where_there_is_none_is_one_line_naming_what_it_needs(tiny_text_model, capsys):
    from slowllama import cli
    assert cli.main(['test_gen', str(tiny_text_model[0]), 'mps']) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('error: --device mps') and 'macOS 14' in err[0]
