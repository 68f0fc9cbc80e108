"""The prepared folder: layout, manifest, checksums, and refusal of damaged files."""
import hashlib
import json
import os

import pytest
import torch

import slowllama
from slowllama.weights.files import SafetensorsFile
from conftest import make_hf_model


@pytest.fixture()
def prepared(tmp_path):
    make_hf_model(tmp_path / 'hf', seed=3, max_shard_size='100KB')
    (tmp_path / 'hf' / 'tokenizer.json').write_text('{}')
    slowllama.prepare(tmp_path / 'hf', tmp_path / 'model', dtype='bf16')
    return tmp_path / 'model'


def test_layout_and_manifest(prepared):
    manifest = json.loads((prepared / 'manifest.json').read_text())
    assert manifest['format'] == 'slowllama-prepared' and manifest['version'] == 1
    assert manifest['dtype'] == 'bf16' and manifest['config']['n_layers'] == 3
    assert manifest['source']['format'] == 'hf'
    blocks = sorted(f for f in os.listdir(prepared) if f.startswith('block_'))
    assert blocks == ['block_000.safetensors', 'block_001.safetensors', 'block_002.safetensors']
    for name, entry in manifest['files'].items():
        data = (prepared / name).read_bytes()
        assert entry['size'] == len(data) and entry['sha256'] == hashlib.sha256(data).hexdigest()
    assert 'tokenizer.json' in manifest['tokenizer']
    block = SafetensorsFile(prepared / 'block_000.safetensors')
    assert block.tensor('self_attn.k_proj.weight').dtype == torch.bfloat16
    assert block.shape('self_attn.k_proj.weight') == (32, 64)  # GQA: 2 kv heads of 16
    assert not [f for f in os.listdir(prepared.parent) if 'staging' in f]


def test_corrupted_block_is_refused_naming_the_file(prepared):
    path = prepared / 'block_001.safetensors'
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # one flipped byte in the weights, same size
    path.write_bytes(bytes(data))
    for offload in ('disk', 'ram'):  # checked when first read, wherever the block lives
        with pytest.raises(slowllama.SlowLlamaError, match='block_001.safetensors.*checksum'):
            slowllama.load(prepared, offload=offload).logits(torch.tensor([[1, 2, 3]]))


def test_truncated_block_is_refused(prepared):
    path = prepared / 'block_002.safetensors'
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(slowllama.SlowLlamaError, match='block_002.safetensors'):
        slowllama.load(prepared, offload='ram')


@pytest.mark.parametrize('header', [b'\xff' * 8, (10).to_bytes(8, 'little') + b'not json!!',
                                    (60).to_bytes(8, 'little') + b'{"x": {"dtype": "F32", "shape": [1000], '
                                    b'"data_offsets": [0, 4000]}}   '])
def test_impossible_safetensors_headers_are_refused(tmp_path, header):
    path = tmp_path / 'bad.safetensors'
    path.write_bytes(header + b'\0' * 16)
    with pytest.raises(slowllama.SlowLlamaError, match='bad.safetensors'):
        SafetensorsFile(path)


def test_failed_prepare_leaves_existing_folder_untouched(prepared, tmp_path):
    before = (prepared / 'manifest.json').read_bytes()
    os.unlink(tmp_path / 'hf' / 'config.json')
    (tmp_path / 'hf' / 'config.json').write_text('{"model_type": "llama", "hidden_size": 64}')
    with pytest.raises((slowllama.SlowLlamaError, KeyError)):
        slowllama.prepare(tmp_path / 'hf', prepared)
    assert (prepared / 'manifest.json').read_bytes() == before
    assert not [f for f in os.listdir(tmp_path) if 'staging' in f]


def test_shape_mismatch_is_refused(tmp_path):
    make_hf_model(tmp_path / 'hf')
    config = json.loads((tmp_path / 'hf' / 'config.json').read_text())
    config['intermediate_size'] = 80
    (tmp_path / 'hf' / 'config.json').write_text(json.dumps(config))
    with pytest.raises(slowllama.SlowLlamaError, match='mlp.gate_proj.weight.*shape'):
        slowllama.prepare(tmp_path / 'hf', tmp_path / 'out')
    assert not (tmp_path / 'out').exists()


def test_prepare_refuses_when_the_disk_is_too_small(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple
    make_hf_model(tmp_path / 'hf')
    usage = namedtuple('usage', 'total used free')
    monkeypatch.setattr(shutil, 'disk_usage', lambda path: usage(10 ** 9, 10 ** 9 - 1000, 1000))
    with pytest.raises(slowllama.SlowLlamaError, match='needs .* GB but .* free'):
        slowllama.prepare(tmp_path / 'hf', tmp_path / 'out')
    assert not (tmp_path / 'out').exists()


def test_verify_command_names_the_damaged_file(prepared, capsys):
    from slowllama.cli import main
    assert main(['verify', str(prepared)]) == 0
    assert 'every file matches' in capsys.readouterr().out
    path = prepared / 'embed.safetensors'
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    assert main(['verify', str(prepared)]) == 2
    assert 'embed.safetensors: checksum mismatch' in capsys.readouterr().err


def test_prepare_checks_what_reached_the_disk(tmp_path, monkeypatch):
    """A write that silently lands different bytes is caught before the folder is swapped in."""
    import slowllama.weights.prepared as store
    make_hf_model(tmp_path / 'hf')
    real = store.write_safetensors

    def flaky(path, tensors, metadata=None):
        digest = real(path, tensors, metadata)
        if path.endswith('block_001.safetensors'):
            with open(path, 'r+b') as f:
                f.seek(-1, 2)
                f.write(b'\x7f')
        return digest
    monkeypatch.setattr(store, 'write_safetensors', flaky)
    with pytest.raises(slowllama.SlowLlamaError, match='block_001.safetensors: checksum mismatch'):
        slowllama.prepare(tmp_path / 'hf', tmp_path / 'out')
    assert not (tmp_path / 'out').exists()
