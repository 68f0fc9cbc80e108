"""A block's shapes and bytes have one source, the block itself (model/block.block_shapes, built on
the meta device): the prepared files, the plan's block and model bytes and LoRA's sizing all read
it. Checked against what prepare writes from a transformers model of each family, in bf16 and
packed nf4 and int8, and against the parameters a loaded model trains."""
import math
import os

import pytest
from conftest import make_hf_model

import slowllama
from slowllama.engine.plan import block_bytes, block_params, lora_params, model_params
from slowllama.model.block import block_shapes
from slowllama.model.lora import LoraConfig, lora_shapes
from slowllama.model.quant import parse_quant
from slowllama.weights.files import SafetensorsFile
from slowllama.weights.prepared import EMBED_FILE, HEAD_FILE, block_file, read_manifest

# rows of 64 and 128 values (int8 packs rows of 32, nf4 blocks of 64); each family's own tensors
FAMILIES = {
    'llama': {'model_type': 'llama'},
    'mistral': {'model_type': 'mistral', 'sliding_window': 5},
    'qwen2': {'model_type': 'qwen2', 'tie_word_embeddings': True},  # q/k/v biases
    'qwen3': {'model_type': 'qwen3', 'head_dim': 32},  # q/k norms, head_dim apart from dim / heads
    'phi3': {'model_type': 'phi3', 'pad_token_id': None},  # fused qkv and gate_up, split at prepare
}
SHAPE = {'intermediate_size': 128, 'num_hidden_layers': 2}
TARGETS = ('q', 'k', 'v', 'o', 'gate', 'up', 'down')


@pytest.fixture(scope='module', params=list(FAMILIES))
def family_hf(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param) / 'hf'
    make_hf_model(folder, seed=5, **SHAPE, **FAMILIES[request.param])
    return request.param, folder


def data_bytes(path):
    """The tensor bytes of a safetensors file (its size less the header)."""
    return os.path.getsize(path) - SafetensorsFile(path).data_start


@pytest.mark.parametrize('dtype, quant', [('bf16', None), ('bf16', 'nf4'), ('fp32', 'int8')])
def test_the_plans_bytes_are_the_prepared_files_bytes(family_hf, dtype, quant, tmp_path):
    family, hf_folder = family_hf
    out = tmp_path / 'prepared'
    slowllama.prepare(hf_folder, out, dtype=dtype, quant=quant)
    cfg = slowllama.ModelConfig.from_dict(read_manifest(out)['config'])
    for i in range(cfg.n_layers):
        assert data_bytes(out / block_file(i)) == block_bytes(cfg, dtype, parse_quant(quant)), (family, i)
        assert set(SafetensorsFile(out / block_file(i)).names()) >= {
            name for name in block_shapes(cfg) if not name.endswith('_proj.weight') or quant is None}
    if quant is None:  # the whole model: blocks, embeddings, final norm and (untied) head
        itemsize = {'bf16': 2, 'fp32': 4}[dtype]
        files = [out / block_file(i) for i in range(cfg.n_layers)] + [out / EMBED_FILE, out / HEAD_FILE]
        assert sum(map(data_bytes, files)) == model_params(cfg) * itemsize


def test_the_block_shapes_are_the_transformers_blocks(family_hf, tmp_path):
    """Every tensor of a transformers layer is one of ours with its shape (Phi-3's fused ones as
    the sum of their parts), and ours has nothing more: the drift the plan once had (no qwen2
    biases, no qwen3 q/k norms) cannot come back."""
    _, hf_folder = family_hf
    slowllama.prepare(hf_folder, tmp_path / 'prepared', dtype='bf16')
    model = slowllama.load(tmp_path / 'prepared', lora=LoraConfig(rank=3, targets=TARGETS))
    cfg, shapes = model.cfg, block_shapes(model.cfg)
    from transformers import AutoModelForCausalLM
    layer = AutoModelForCausalLM.from_pretrained(hf_folder).model.layers[0].state_dict()
    fused = {'self_attn.qkv_proj.weight': ('q', 'k', 'v'), 'mlp.gate_up_proj.weight': ('gate', 'up')}
    ours = {}
    for name, tensor in layer.items():
        parts = fused.get(name)
        rows = sum(shapes[f'{name.split(".")[0]}.{t}_proj.weight'][0] for t in parts) if parts else None
        ours[name] = (rows, shapes[f'{name.split(".")[0]}.{parts[0]}_proj.weight'][1]) if parts else shapes[name]
        assert tuple(tensor.shape) == ours[name], name
    assert sum(math.prod(s) for s in ours.values()) == sum(math.prod(s) for s in shapes.values()) == block_params(cfg)
    # LoRA: the planner's count is the trainable parameters the loaded model has
    trainable = sum(p.numel() for p in model.trainable_parameters().values())
    assert trainable == lora_params(cfg, 3, TARGETS) == cfg.n_layers * sum(
        math.prod(s) for s in lora_shapes(cfg, LoraConfig(rank=3, targets=TARGETS)).values())
