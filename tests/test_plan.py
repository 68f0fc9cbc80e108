"""The memory planner, automatic placement, and a mixed placement streaming like the others."""

import slowllama
import slowllama.engine.placement as placement_module
import slowllama.weights.store as store_module
from slowllama.engine.plan import GIB, block_params, model_params, place_blocks, predict
from slowllama.model.config import ModelConfig
from slowllama.weights.prepared import block_file
from reference import assert_same_loss_and_gradients

LLAMA_7B = ModelConfig(dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, hidden_dim=11008, vocab_size=32000)


def test_model_size_matches_the_known_7b_count():
    assert abs(model_params(LLAMA_7B) - 6.738e9) < 1e6


def test_streaming_needs_a_fraction_of_resident_memory():
    resident = predict(LLAMA_7B, 16, 128, 'bf16', resident_blocks=32)
    streamed = predict(LLAMA_7B, 16, 128, 'bf16')
    assert resident.device_bytes > 12.5 * GIB  # the weights alone are 12.55 GiB
    assert streamed.device_bytes < 3 * GIB
    assert predict(LLAMA_7B, 32, 512, 'bf16').device_bytes > streamed.device_bytes


def test_on_a_cpu_blocks_are_counted_where_they_lie():
    """One memory, no copies: from disk two mapped blocks at a time (the one computing, the next
    faulted in ahead), held in RAM the whole model."""
    weights = model_params(LLAMA_7B) * 2
    block = block_params(LLAMA_7B) * 2
    from_disk = predict(LLAMA_7B, 4, 128, 'bf16', device_is_host=True)
    in_ram = predict(LLAMA_7B, 4, 128, 'bf16', ram_blocks=32, device_is_host=True)
    assert from_disk.host_bytes == from_disk.device_bytes
    assert block < from_disk.host_bytes < 2 * block + 1 * GIB
    assert weights < in_ram.host_bytes < weights + 1 * GIB


def test_placement_fills_the_device_first_then_ram():
    everything = place_blocks(LLAMA_7B, 16, 128, 'bf16', device_budget=40 * GIB, ram_budget=64 * GIB)
    assert everything.resident_blocks == 32
    mixed = place_blocks(LLAMA_7B, 16, 128, 'bf16', device_budget=8 * GIB, ram_budget=64 * GIB)
    assert 0 < mixed.resident_blocks < 32 and mixed.ram_blocks == 32 - mixed.resident_blocks
    assert mixed.device_bytes <= 8 * GIB
    tight = place_blocks(LLAMA_7B, 16, 128, 'bf16', device_budget=3 * GIB, ram_budget=4 * GIB)
    assert tight.resident_blocks + tight.ram_blocks < 32 and tight.host_bytes <= 4 * GIB


def test_mixed_placement_gives_the_same_gradients(tiny_prepared, monkeypatch):
    model_dir, _, _ = tiny_prepared
    lora = slowllama.LoraConfig(rank=4, dropout=0.1, targets=('q', 'v', 'down'))
    baseline = slowllama.load(model_dir, lora=lora, offload='disk', dropout=0.1)

    def mixed(cfg, *args, **kwargs):
        tiers = {block_file(i): 'ram' if i == 0 else 'disk' for i in range(cfg.n_layers)}
        return {**tiers, store_module.EMBED_FILE: 'ram', store_module.HEAD_FILE: 'disk'}
    monkeypatch.setattr(placement_module, 'placement', mixed)
    other = slowllama.load(model_dir, lora=lora, dropout=0.1)
    assert other.store.offload == 'mixed'
    assert_same_loss_and_gradients(baseline, other, seed=3)


def test_auto_on_cpu_maps_blocks_when_dtypes_match(tiny_prepared):
    model_dir, _, _ = tiny_prepared  # prepared in fp32
    assert slowllama.load(model_dir, dtype='fp32').store.offload == 'disk'


def test_plan_command_prints_both_peaks(capsys):
    from slowllama.cli import main
    assert main(['plan', '--shape', '7b', '--batch-size', '16', '--seq-len', '128']) == 0
    out = capsys.readouterr().out
    assert 'device' in out and 'host' in out and '6.74B' in out
