"""The way blocks reach the device: a fetch that fails at any point gives its copy slot back and
leaves the model usable, on every tier; the host arena; and the planner counting every pinned byte.

On this cpu the device path (staging in the reader thread, copies into the two slot buffers, the
slots' bookkeeping) runs when the copier is told it is not on a cpu: its CopyQueue still copies
synchronously and its events are None, so the same code runs as on cuda, without the overlap."""
import math

import pytest
import torch
from conftest import random_batch
from reference import randomize_adapters

import slowllama
import slowllama.engine.placement as placement_module
from slowllama.engine.plan import pinned_bytes, predict
from slowllama.model.config import ModelConfig
from slowllama.weights import copier as copier_module
from slowllama.weights.copier import DeviceCopier, Pending, Ready
from slowllama.weights.files import SafetensorsFile
from slowllama.weights.pinned import ALIGNMENT, ROW_STAGING_BYTES, HostArena, arena_bytes, arena_layout
from slowllama.weights.prepared import EMBED_FILE, HEAD_FILE, block_file, block_shapes

TIERS = {  # blocks 0, 1, 2 of the tiny model, then the embeddings and head
    'disk': ['disk'] * 5, 'ram': ['ram'] * 5, 'device': ['device'] * 5,
    'mixed': ['device', 'ram', 'disk', 'ram', 'disk'],
}


def placed(tiers):
    def placement(cfg, *args, **kwargs):
        files = [block_file(i) for i in range(cfg.n_layers)] + [EMBED_FILE, HEAD_FILE]
        return dict(zip(files, tiers))
    return placement


def load(model_dir, dtype, as_device):
    lora = slowllama.LoraConfig(rank=4, dropout=0.1, targets=('q', 'v', 'down'))
    model = slowllama.load(model_dir, lora=lora, dropout=0.1, dtype=dtype)
    if as_device:
        model.store._copier.on_cpu = False  # copy through staging and slot buffers as on cuda
    randomize_adapters(model.adapters)
    return model


def step(model):
    """Loss and gradients of one backward from a fixed seed and zeroed gradients."""
    for p in model.trainable_parameters().values():
        p.grad = None
    tokens, targets = random_batch(model.cfg.vocab_size)
    torch.manual_seed(11)
    loss = model.backward(tokens, targets)
    return loss, {name: p.grad.clone() for name, p in model.trainable_parameters().items()}


class Fault:
    """Raises `error` at the `at`-th call of the patched functions, once."""

    def __init__(self, error, at):
        self.error, self.at, self.calls, self.fired = error, at, 0, 0

    def wrap(self, function):
        def faulty(*args, **kwargs):
            self.calls += 1
            if self.calls == self.at:
                self.fired += 1
                raise self.error
            return function(*args, **kwargs)
        return faulty


POINTS = {  # where a fetch can fail -> (what is raised, the functions that raise it)
    'reader thread': (OSError('read error (injected)'), [(DeviceCopier, '_convert'), (DeviceCopier, '_stage')]),
    'wait (Ctrl-C)': (KeyboardInterrupt(), [(Pending, 'wait'), (Ready, 'wait')]),
    'allocation': (torch.OutOfMemoryError('out of memory (injected)'), [(DeviceCopier, '_slot_buffers'),
                                                                       (DeviceCopier, '_staging_slot')]),
}


def fail_once(model, monkeypatch, point, at):
    """A step of `model` with POINTS[point]'s fault raised at the at-th call -> how often it fired."""
    error, targets = POINTS[point]
    fault = Fault(error, at)
    with monkeypatch.context() as patch:
        for owner, name in targets:
            patch.setattr(owner, name, fault.wrap(getattr(owner, name)))
        try:
            step(model)
        except BaseException as raised:  # noqa: B036 (KeyboardInterrupt is one of them)
            assert raised is error
    return fault.fired


CONFIGS = [  # (compute dtype, copy as on a device)
    (torch.bfloat16, False),  # the fp32 file converted into the slot buffers in the reader thread
    (torch.bfloat16, True),   # ... converted into the staging buffers, then copied
]
FIRES = {'reader thread': {'disk', 'mixed'}, 'wait (Ctrl-C)': set(TIERS), 'allocation': {'disk', 'ram', 'mixed'}}


@pytest.mark.parametrize('tier', list(TIERS))
def test_a_failed_fetch_leaves_the_model_usable(tiny_text_model, monkeypatch, tier):
    """Failures injected at each point of a fetch, one pass after another (each pass runs until
    its fault), then a whole pass: the same loss and gradients as a model that never failed."""
    model_dir, _, _ = tiny_text_model
    monkeypatch.setattr(placement_module, 'placement', placed(TIERS[tier]))
    fired = {point: 0 for point in POINTS}
    for dtype, as_device in CONFIGS:
        clean_loss, clean_grads = step(load(model_dir, dtype, as_device))
        model = load(model_dir, dtype, as_device)
        for point in POINTS:
            for at in (1, 4):  # in the forward; on the disk tier also in the backward's recomputation
                fired[point] += fail_once(model, monkeypatch, point, at)
                store = model.store
                assert not store._held and not store._pending and store._copier._in_use == [False, False]
        loss, grads = step(model)
        assert loss == clean_loss
        assert all(torch.equal(grads[k], clean_grads[k]) for k in clean_grads)
    assert {point for point, n in fired.items() if n} == {point for point in POINTS if tier in FIRES[point]}


def test_a_failed_logits_pass_leaves_the_model_usable(tiny_text_model, monkeypatch):
    model_dir, _, _ = tiny_text_model
    monkeypatch.setattr(placement_module, 'placement', placed(TIERS['mixed']))
    model = load(model_dir, torch.bfloat16, as_device=True)
    tokens, _ = random_batch(model.cfg.vocab_size)
    expected = model.logits(tokens)
    with monkeypatch.context() as patch:
        patch.setattr(Pending, 'wait', Fault(KeyboardInterrupt(), 1).wrap(Pending.wait))
        with pytest.raises(KeyboardInterrupt):
            model.logits(tokens)
    assert model.store._copier._in_use == [False, False]
    assert torch.equal(model.logits(tokens), expected)


# --- the host arena ------------------------------------------------------------------------

def test_arena_views_are_aligned_apart_and_hold_what_is_written():
    specs = {'a': ((3, 5), torch.bfloat16), 'b': ((7,), torch.float32), 'c': ((2, 2, 2), torch.float16),
             'empty': ((0, 4), torch.float32)}
    offsets, total = arena_layout(specs)
    assert all(offset % ALIGNMENT == 0 for offset in offsets.values())
    assert total == 3 * ALIGNMENT  # each tensor under a page: one page each, none for the empty one
    arena = HostArena(specs)
    assert arena.nbytes == total and arena.memory.numel() == total and not arena.pinned
    base = arena.memory.data_ptr()
    assert base % ALIGNMENT == 0
    for key, (shape, dtype) in specs.items():
        view = arena.tensors[key]
        assert view.shape == shape and view.dtype == dtype and view.is_contiguous()
        if view.numel():
            assert view.data_ptr() - base == offsets[key]
    values = {key: torch.randn(shape).to(dtype) for key, (shape, dtype) in specs.items()}
    for key, value in values.items():
        arena.tensors[key].copy_(value)
    assert all(torch.equal(arena.tensors[key], value) for key, value in values.items())  # no overlap


def test_the_ram_tier_lives_in_one_arena(tiny_text_model):
    model_dir, _, _ = tiny_text_model
    model = slowllama.load(model_dir, offload='ram', dtype=torch.bfloat16)
    store = model.store
    memory = store._arena.memory
    start, end = memory.data_ptr(), memory.data_ptr() + memory.numel()
    for filename, tensors in store._resident.items():
        source = SafetensorsFile(f'{model_dir}/{filename}')
        for name, tensor in tensors.items():
            assert start <= tensor.data_ptr() < end and tensor.dtype == torch.bfloat16
            assert torch.equal(tensor, source.tensor(name).to(torch.bfloat16))


# --- the planner counts every pinned byte -----------------------------------------------------

LLAMA_7B = ModelConfig(dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, hidden_dim=11008, vocab_size=32000)
LLAMA_13B = ModelConfig(dim=5120, n_layers=40, n_heads=40, n_kv_heads=40, hidden_dim=13824, vocab_size=32000)


def ram_tier_specs(cfg, dtype, ram_blocks):
    """What BlockStore puts in its arena: the RAM-tier blocks, the embeddings, the final norm and head."""
    specs = {(i, name): (shape, dtype) for i in range(ram_blocks) for name, shape in block_shapes(cfg).items()}
    specs.update({'embed': ((cfg.vocab_size, cfg.dim), dtype), 'norm': ((cfg.dim,), dtype),
                  'head': ((cfg.vocab_size, cfg.dim), dtype)})
    return specs


@pytest.mark.parametrize('cfg', [LLAMA_7B, LLAMA_13B], ids=['7b', '13b'])
def test_planned_host_bytes_are_the_arenas_bytes(cfg):
    """All in RAM: the arena is the planned bytes within its page alignment, not the power of two
    (per block) that torch's pinned allocator would take: a 13B in RAM plans 24.4 GiB, not 41."""
    ram = predict(cfg, 16, 128, 'bf16', ram_blocks=cfg.n_layers)
    arena = arena_bytes(ram_tier_specs(cfg, torch.bfloat16, cfg.n_layers))
    assert ram.host_bytes <= arena <= ram.host_bytes + (len(block_shapes(cfg)) * cfg.n_layers + 3) * ALIGNMENT
    assert ram.host_bytes == pinned_bytes(cfg, 2, 0, cfg.n_layers)
    rounded = lambda nbytes: 1 << (nbytes - 1).bit_length()  # noqa: E731  (torch's pinned allocator)
    per_tensor = cfg.n_layers * sum(rounded(math.prod(shape) * 2) for shape in block_shapes(cfg).values())
    assert arena < 0.8 * per_tensor


def test_streaming_from_disk_plans_its_staging_buffers_and_ram_blocks_bring_the_tables():
    w = 2
    block = arena_bytes({name: (shape, torch.bfloat16) for name, shape in block_shapes(LLAMA_7B).items()})
    tables = 2 * LLAMA_7B.vocab_size * LLAMA_7B.dim * w
    from_disk = pinned_bytes(LLAMA_7B, w, resident_blocks=0, ram_blocks=0)
    assert from_disk == pytest.approx(2 * block + 2 * ROW_STAGING_BYTES, abs=9 * 2 * ALIGNMENT)  # + the head's two
    some_in_ram = pinned_bytes(LLAMA_7B, w, resident_blocks=0, ram_blocks=4)
    assert some_in_ram - from_disk >= 4 * (block - 9 * ALIGNMENT) + tables
    on_device = pinned_bytes(LLAMA_7B, w, resident_blocks=32, ram_blocks=0)
    assert on_device == 0


def test_torchrun_ranks_share_the_host_memory(monkeypatch):
    from slowllama.engine.placement import placement
    from slowllama.weights import host_memory as memory
    monkeypatch.setattr(placement_module, 'free_device_memory', lambda device: 8 * 2 ** 30)
    monkeypatch.setattr(placement_module, 'free_host_memory', lambda: 24 * 2 ** 30)
    device = torch.device('cuda')  # only planned, nothing allocated
    alone = placement(LLAMA_7B, device, torch.bfloat16, 'auto', 'bf16', batch_hint=(16, 128))
    monkeypatch.setenv('LOCAL_WORLD_SIZE', '4')
    assert memory.host_share() == 4
    shared = placement(LLAMA_7B, device, torch.bfloat16, 'auto', 'bf16', batch_hint=(16, 128))
    count = lambda tiers, tier: sum(t == tier for f, t in tiers.items() if f.startswith('block_'))  # noqa: E731
    assert count(alone, 'disk') == 0 and count(shared, 'disk') > 0
    in_ram = count(shared, 'ram')
    plan = predict(LLAMA_7B, 16, 128, 'bf16', resident_blocks=count(shared, 'device'), ram_blocks=in_ram)
    assert plan.host_bytes <= 0.9 * 24 * 2 ** 30 / 4


def test_unified_memory_is_one_budget(monkeypatch):
    """On a Mac (mps) there is no RAM tier beside the device: what does not fit streams from disk,
    and the host buffers count in the same budget."""
    from slowllama.engine.placement import placement
    monkeypatch.setattr(placement_module, 'free_device_memory', lambda device: 10 * 2 ** 30)
    monkeypatch.setattr(placement_module, 'free_host_memory', lambda: 10 * 2 ** 30)
    tiers = placement(LLAMA_7B, torch.device('mps'), torch.bfloat16, 'auto', 'bf16', batch_hint=(4, 128))
    blocks = [t for f, t in tiers.items() if f.startswith('block_')]
    assert 'ram' not in blocks and 0 < blocks.count('device') < 32
    resident = blocks.count('device')
    plan = predict(LLAMA_7B, 4, 128, 'bf16', resident_blocks=resident)
    assert plan.device_bytes + plan.host_bytes <= 0.9 * 10 * 2 ** 30


def test_on_a_mac_the_device_budget_is_what_the_os_has_free(monkeypatch):
    """Unified memory: the free bytes psutil reports, within what Metal allows the process."""
    from collections import namedtuple

    import psutil

    from slowllama.weights.host_memory import free_device_memory
    memory = namedtuple('memory', 'total available')
    monkeypatch.setattr(torch.mps, 'recommended_max_memory', lambda: 21 * 2 ** 30, raising=False)
    monkeypatch.setattr(torch.mps, 'driver_allocated_memory', lambda: 1 * 2 ** 30, raising=False)
    monkeypatch.setattr(psutil, 'virtual_memory', lambda: memory(32 * 2 ** 30, 12 * 2 ** 30))
    assert free_device_memory(torch.device('mps')) == 12 * 2 ** 30  # a busy 32 GB Mac: the OS's figure
    monkeypatch.setattr(psutil, 'virtual_memory', lambda: memory(128 * 2 ** 30, 100 * 2 ** 30))
    assert free_device_memory(torch.device('mps')) == 20 * 2 ** 30  # a 128 GB Mac: Metal's limit, not 8 GiB


def test_head_rows_from_disk_travel_through_two_staging_buffers_in_chunks(monkeypatch):
    """A slice larger than a staging buffer (generation takes the whole vocabulary at once) goes
    in chunks, the buffers taking turns, converted to the compute dtype on the host."""
    from slowllama.weights.copier import RowStager
    from slowllama.weights.streams import CopyQueue
    monkeypatch.setattr(copier_module, 'ROW_STAGING_BYTES', 10 * 64 * 2)  # ten bf16 rows of 64
    stager = RowStager(CopyQueue(torch.device('cpu')), 64, torch.bfloat16)
    assert stager.rows == 10 and stager.arena.nbytes == 2 * ALIGNMENT
    table = torch.randn(95, 64)  # fp32, as a mapped fp32 file gives it
    for start, end in [(0, 7), (7, 95), (40, 41)]:
        got = stager.bring(table[start:end])
        assert got.dtype == torch.bfloat16 and torch.equal(got, table[start:end].to(torch.bfloat16))
        staged = stager.arena.memory.data_ptr(), stager.arena.memory.data_ptr() + stager.arena.nbytes
        assert not staged[0] <= got.data_ptr() < staged[1]  # a copy, not a view of a buffer reused later
