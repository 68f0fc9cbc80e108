"""Export: HF -> prepare -> export hf / meta / peft reproduces transformers + peft's logits with the
adapter; Meta shards split as Meta splits them; failures leave an existing output alone."""
import copy
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import slowllama
from checkpoints import split_dims
from conftest import random_batch
from reference import peft_model
from slowllama.weights.formats.export import export

TARGETS = ('q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj')


@pytest.fixture(scope='module')
def with_adapter(tiny_prepared, tmp_path_factory):
    """(prepared folder, hf model, adapter folder, peft reference logits, tokens)."""
    model_dir, _, hf_model = tiny_prepared
    reference = peft_model(hf_model, rank=4, alpha=8.0, targets=TARGETS, seed=7)
    adapter = tmp_path_factory.mktemp('adapter')
    reference.save_pretrained(adapter)
    tokens, _ = random_batch(hf_model.config.vocab_size, seq=16)
    with torch.no_grad():
        logits = reference(input_ids=tokens).logits
        assert (logits - hf_model(tokens).logits).abs().max() > 1e-3  # the adapter matters
    return model_dir, hf_model, adapter, logits, tokens


def test_export_hf_loads_in_transformers_with_merged_adapter(with_adapter, tmp_path):
    from transformers import AutoModelForCausalLM
    model_dir, _, adapter, ref_logits, tokens = with_adapter
    export(model_dir, tmp_path / 'hf', 'hf', adapter=adapter, dtype='fp32', max_shard_bytes=60_000)
    assert (tmp_path / 'hf' / 'model.safetensors.index.json').exists()  # sharded above the size
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / 'hf', dtype=torch.float32).eval()
    with torch.no_grad():
        diff = (merged(tokens).logits - ref_logits).abs().max().item()
    print(f'export hf: max |logit diff| vs peft {diff:.2e}')
    assert diff < 1e-4


@pytest.mark.parametrize('n_shards', [1, 2])
def test_export_meta_shards_reprepare_to_the_same_logits(with_adapter, tmp_path, n_shards):
    model_dir, hf_model, adapter, ref_logits, tokens = with_adapter
    export(model_dir, tmp_path / 'meta', 'meta', adapter=adapter, shards=n_shards, dtype='fp32')
    files = sorted(os.listdir(tmp_path / 'meta'))
    assert [f for f in files if f.endswith('.pth')] == [f'consolidated.{s:02d}.pth' for s in range(n_shards)]
    params = json.loads((tmp_path / 'meta' / 'params.json').read_text())
    assert params['n_kv_heads'] == hf_model.config.num_key_value_heads
    shards = [torch.load(tmp_path / 'meta' / f'consolidated.{s:02d}.pth', weights_only=True)
              for s in range(n_shards)]
    for name, dim in split_dims().items():
        full = 'layers.0.' + name if name.startswith(('attention', 'feed_forward', 'ffn_norm')) else name
        shapes = [tuple(shard[full].shape) for shard in shards]
        if dim is None:
            assert all(torch.equal(shards[0][full], shard[full]) for shard in shards)
        else:
            total = sum(shape[dim] for shape in shapes)
            assert all(shape[dim] * n_shards == total for shape in shapes), name
    slowllama.prepare(tmp_path / 'meta', tmp_path / 'again', dtype='fp32')
    diff = (slowllama.load(tmp_path / 'again').logits(tokens) - ref_logits).abs().max().item()
    print(f'export meta MP={n_shards}: max |logit diff| vs peft {diff:.2e}')
    assert diff < 1e-4


def test_export_peft_loads_in_peft(with_adapter, tmp_path):
    from peft import PeftModel
    model_dir, hf_model, adapter, ref_logits, tokens = with_adapter
    export(model_dir, tmp_path / 'peft', 'peft', adapter=adapter)
    loaded = PeftModel.from_pretrained(copy.deepcopy(hf_model), tmp_path / 'peft').eval()
    with torch.no_grad():
        diff = (loaded(input_ids=tokens).logits - ref_logits).abs().max().item()
    assert diff < 1e-5


def test_export_without_adapter_is_the_base_model(tiny_prepared, tmp_path):
    from transformers import AutoModelForCausalLM
    model_dir, _, hf_model = tiny_prepared
    export(model_dir, tmp_path / 'hf', 'hf', dtype='fp32')
    again = AutoModelForCausalLM.from_pretrained(tmp_path / 'hf', dtype=torch.float32).eval()
    tokens, _ = random_batch(hf_model.config.vocab_size)
    with torch.no_grad():
        assert torch.allclose(again(tokens).logits, hf_model(tokens).logits, atol=1e-5)


def test_failures_leave_the_existing_output_alone(with_adapter, tmp_path, monkeypatch):
    model_dir, _, adapter, _, _ = with_adapter
    out = tmp_path / 'out'
    export(model_dir, out, 'peft', adapter=adapter)
    before = {name: (out / name).read_bytes() for name in os.listdir(out)}

    wrong = tmp_path / 'wrong'
    shutil.copytree(adapter, wrong)
    config = json.loads((wrong / 'adapter_config.json').read_text())
    (wrong / 'adapter_config.json').write_text(json.dumps({**config, 'r': 3}))
    with pytest.raises(slowllama.SlowLlamaError, match='shape'):
        export(model_dir, out, 'hf', adapter=wrong)
    with pytest.raises(slowllama.SlowLlamaError, match='^shards 5'):
        export(model_dir, out, 'meta', adapter=adapter, shards=5)

    import slowllama.weights.formats.export as export_module
    monkeypatch.setattr(export_module.shutil, 'disk_usage', lambda path: shutil._ntuple_diskusage(10, 10, 1000))
    with pytest.raises(slowllama.SlowLlamaError, match='not enough disk space'):
        export(model_dir, out, 'hf', adapter=adapter)
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == before
    assert [p for p in os.listdir(tmp_path) if 'staging' in p] == []


def test_export_command_line(with_adapter, tmp_path):
    model_dir, _, adapter, _, _ = with_adapter
    script = os.path.join(os.path.dirname(__file__), '..', 'scripts', 'export.py')
    run = lambda *args: subprocess.run([sys.executable, script, *map(str, args)],  # noqa: E731
                                       capture_output=True, text=True, timeout=300)
    done = run('--model', model_dir, '--lora', adapter, '--format', 'meta', '--shards', '2', '--out', tmp_path / 'm')
    assert done.returncode == 0, done.stderr
    assert (tmp_path / 'm' / 'consolidated.01.pth').exists() and (tmp_path / 'm' / 'params.json').exists()
    done = run('--model', tmp_path / 'nowhere', '--format', 'hf', '--out', tmp_path / 'h')
    assert done.returncode != 0 and done.stderr.count('\n') == 1 and 'nowhere' in done.stderr
    done = run('--model', model_dir, '--format', 'peft', '--out', tmp_path / 'p')
    assert done.returncode != 0 and '--lora' in done.stderr and 'Traceback' not in done.stderr


def test_corrupt_prepared_file_is_refused(tiny_prepared, tmp_path):
    model_dir, _, _ = tiny_prepared
    copy_dir = tmp_path / 'model'
    shutil.copytree(model_dir, copy_dir)
    block = copy_dir / 'block_001.safetensors'
    data = bytearray(block.read_bytes())
    data[-1] ^= 0xFF
    block.write_bytes(bytes(data))
    with pytest.raises(slowllama.SlowLlamaError, match='block_001.safetensors: checksum mismatch'):
        export(copy_dir, tmp_path / 'out', 'hf')
    assert not (tmp_path / 'out').exists()
