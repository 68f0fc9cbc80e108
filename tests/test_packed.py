"""Quantized models (prepare --quant): packed on disk, in RAM and on the device, and the streamed
engine on them against transformers + peft + bitsandbytes QLoRA, against whole-model autograd on
the dequantized weights, and across tiers; GGUF Q8_0 carried over; bad input refused."""
import json
import os

import numpy as np
import pytest
import torch
from checkpoints import write_gguf
from conftest import make_hf_model, random_batch, save_tiny_tokenizer
from reference import (
    against_whole_model,
    assert_same_loss_and_gradients,
    max_rel_diff,
    peft_grads,
    peft_model,
    step_beside_peft,
)

import slowllama
from slowllama import cli
from slowllama.model import quant
from slowllama.model.quant import Quant
from slowllama.weights.files import SafetensorsFile, sha256_file, write_json, write_safetensors

HF_TARGETS = ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj']
# rows a multiple of 64: bitsandbytes' CPU dequantize kernel cuts blocks per row (see test_quant.py)
QUANT_TINY = dict(intermediate_size=128)


@pytest.fixture(scope='module')
def quant_hf(tmp_path_factory):
    folder = tmp_path_factory.mktemp('hf_quant')
    model = make_hf_model(folder, seed=4, max_shard_size='100KB', bos_token_id=1, eos_token_id=2,
                          pad_token_id=3, **QUANT_TINY)
    save_tiny_tokenizer(folder)
    return folder, model


@pytest.fixture(scope='module', params=['nf4', 'nf4-dq', 'int8'])
def prepared(request, quant_hf, tmp_path_factory):
    """(prepared folder, Quant), fp32 norms."""
    hf_folder, _ = quant_hf
    q = Quant('nf4', True) if request.param == 'nf4-dq' else Quant(request.param)
    out = tmp_path_factory.mktemp('prepared_quant') / 'model'
    slowllama.prepare(hf_folder, out, dtype='fp32', quant=q)
    return out, q


def bnb_base(hf_folder, device='cpu', double_quant=False):
    """The HF folder loaded by transformers, its projections quantized by bitsandbytes (nf4, fp32
    compute; with double_quant, its absmax in 8 bits: bitsandbytes' compress_statistics)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type='nf4', bnb_4bit_compute_dtype=torch.float32,
                                bnb_4bit_use_double_quant=double_quant)
    model = AutoModelForCausalLM.from_pretrained(hf_folder, quantization_config=config, dtype=torch.float32,
                                                 device_map=device)
    for module in model.modules():  # on a CPU with AVX512-BF16, bitsandbytes' eval path computes in bf16
        if hasattr(module, 'support_avx512bf16_for_cpu'):  # (and keeps a repacked weight without autograd)
            module.support_avx512bf16_for_cpu = False
    return model


def bnb_qlora(hf_folder, lora_dropout, seed=0, device='cpu', double_quant=False):
    """QLoRA as peft builds it: bnb_base + a non-zero LoRA on every projection."""
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(seed)
    return get_peft_model(bnb_base(hf_folder, device, double_quant),
                          LoraConfig(r=4, lora_alpha=8, target_modules=HF_TARGETS, lora_dropout=lora_dropout,
                                     init_lora_weights=False))


def same_packing_as_bitsandbytes(model_dir, reference):
    """Every projection of the prepared folder (nf4 with double quantization) against the state
    bitsandbytes made of the same weight: the same bytes, the same absmax of the absmax and the same
    offset. The 8-bit absmax codes: ours are the nearest of the dynamic map, bitsandbytes' CPU
    kernel (an approximate search) takes a neighbour for a few (test_quant.py): those are put into
    its state, so both compute with the same weights. -> (codes, codes that differed)."""
    layers = reference.base_model.model.model.layers
    codes = differ = 0
    for i, layer in enumerate(layers):
        block = SafetensorsFile(model_dir / f'block_{i:03d}.safetensors')
        for path in [f'self_attn.{n}' for n in ('q_proj', 'k_proj', 'v_proj', 'o_proj')] + \
                    [f'mlp.{n}' for n in ('gate_proj', 'up_proj', 'down_proj')]:
            weight = layer.get_submodule(path).base_layer.weight
            state = weight.quant_state
            assert state.nested and state.blocksize == quant.NF4_BLOCK and state.state2.blocksize == quant.ABSMAX_BLOCK
            assert torch.equal(block.tensor(f'{path}.qweight'), weight.data.reshape(-1)), path
            assert torch.equal(block.tensor(f'{path}.absmax_scale'), state.state2.absmax), path
            assert torch.equal(block.tensor(f'{path}.absmax_offset')[0], state.offset), path
            ours = block.tensor(f'{path}.absmax')
            steps = (ours.int() - state.absmax.int()).abs()
            assert steps.max() <= 1, path
            codes, differ = codes + ours.numel(), differ + int((steps > 0).sum())
            state.absmax = ours.clone()
    return codes, differ


@pytest.mark.parametrize('double_quant', [False, True], ids=['nf4', 'nf4-double-quant'])
def test_nf4_equals_transformers_peft_bitsandbytes_with_dropout(quant_hf, tmp_path, double_quant):
    """(b): logits, loss and every LoRA gradient of the streamed backward on an nf4 model against
    QLoRA as transformers + peft + bitsandbytes run it, from the same HF folder, LoRA dropout 0.1;
    with double quantization against bnb_4bit_use_double_quant (see same_packing_as_bitsandbytes)."""
    hf_folder, _ = quant_hf
    slowllama.prepare(hf_folder, tmp_path / 'nf4', dtype='fp32', quant=Quant('nf4', double_quant))
    reference = bnb_qlora(hf_folder, lora_dropout=0.1, double_quant=double_quant)
    if double_quant:
        codes, differ = same_packing_as_bitsandbytes(tmp_path / 'nf4', reference)
        print(f'\nnf4 double quant: {differ} of {codes} absmax codes one step from bitsandbytes\'')
        assert differ <= 0.01 * codes
    reference.save_pretrained(tmp_path / 'adapter')
    ours = slowllama.load(tmp_path / 'nf4', adapter=tmp_path / 'adapter', lora=slowllama.LoraConfig(dropout=0.1))
    tokens, targets = random_batch(ours.cfg.vocab_size, seed=3)

    ref_logits, logit_diff, loss, ref_loss = step_beside_peft(ours, reference, tokens, targets)
    ref_grads = peft_grads(reference)
    grads = {k: p.grad for k, p in ours.trainable_parameters().items()}
    assert set(grads) == set(ref_grads)
    worst = max(max_rel_diff(grads[k], ref_grads[k]) for k in grads)
    print(f'\nnf4 vs bitsandbytes: max logit diff {logit_diff:.2e}, loss diff {abs(loss - ref_loss.item()):.2e}, '
          f'max relative grad diff {worst:.2e}')
    assert logit_diff < 1e-4 and abs(loss - ref_loss.item()) < 1e-5 and worst < 1e-5
    if double_quant:
        return
    plain = slowllama.load(hf_folder_prepared(hf_folder, tmp_path), adapter=tmp_path / 'adapter')
    assert (plain.logits(tokens) - ref_logits).abs().max() > 100 * max(logit_diff, 1e-6)  # the 4 bits are real


def test_int8_equals_transformers_peft_on_a_q8_0_gguf_of_the_same_weights(quant_hf, tmp_path):
    """(b) for --quant int8: transformers reads a GGUF whose projections gguf's own writer quantized
    to Q8_0 (llama.cpp's reference) and dequantizes them; with a peft adapter on it: the logits, loss
    and every LoRA gradient of our int8 model prepared from the HF folder."""
    import gguf
    from transformers import AutoModelForCausalLM
    T = gguf.GGMLQuantizationType
    hf_folder, hf_model = quant_hf
    write_gguf(tmp_path / 'q8.gguf', hf_model, {'*': T.Q8_0, 'token_embd.weight': T.F32, 'output.weight': T.F32},
               tokenizer={'add_vocab_size': hf_model.config.vocab_size})
    base = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file='q8.gguf', dtype=torch.float32).eval()
    reference = peft_model(base, rank=4, alpha=8.0, targets=HF_TARGETS, seed=2)
    reference.save_pretrained(tmp_path / 'adapter')
    slowllama.prepare(hf_folder, tmp_path / 'int8', dtype='fp32', quant='int8')
    ours = slowllama.load(tmp_path / 'int8', adapter=tmp_path / 'adapter')
    tokens, targets = random_batch(ours.cfg.vocab_size, seed=3)
    ref_logits, logit_diff, loss, ref_loss = step_beside_peft(ours, reference, tokens, targets)
    ref_grads = peft_grads(reference)
    grads = {k: p.grad for k, p in ours.trainable_parameters().items()}
    worst = max(max_rel_diff(grads[k], ref_grads[k]) for k in grads)
    print(f'\nint8 vs transformers on Q8_0: max logit diff {logit_diff:.2e}, '
          f'loss diff {abs(loss - ref_loss.item()):.2e}, max relative grad diff {worst:.2e}')
    assert set(grads) == set(ref_grads)
    assert logit_diff < 1e-4 and abs(loss - ref_loss.item()) < 1e-5 and worst < 1e-5
    with torch.no_grad():
        unquantized = peft_model(hf_model, rank=4, alpha=8.0, targets=HF_TARGETS, seed=2)(input_ids=tokens).logits
    assert (unquantized - ref_logits).abs().max() > 100 * max(logit_diff, 1e-6)  # the 8 bits are real


def hf_folder_prepared(hf_folder, tmp_path):
    slowllama.prepare(hf_folder, tmp_path / 'fp32', dtype='fp32')
    return tmp_path / 'fp32'


def test_streamed_equals_whole_model_on_the_dequantized_weights(prepared):
    """(a) on packed blocks: the whole model built from the store's unpacked blocks, same seed,
    model and LoRA dropout 0.1: same loss and gradients."""
    _, loss_diff, worst = against_whole_model(prepared[0])
    assert loss_diff < 1e-5 and worst < 1e-5


@pytest.mark.parametrize('offload, dtype', [('ram', torch.float32), ('device', torch.float32),
                                           ('ram', torch.bfloat16)])
def test_tiers_give_identical_gradients(prepared, offload, dtype):
    """(c): disk, ram and device tiers on packed blocks give the same bits."""
    model_dir, _ = prepared
    lora = slowllama.LoraConfig(rank=4, dropout=0.1, targets=('q', 'v', 'down'))
    baseline = slowllama.load(model_dir, lora=lora, offload='disk', dropout=0.1, dtype=dtype)
    other = slowllama.load(model_dir, lora=lora, offload=offload, dropout=0.1, dtype=dtype)
    assert_same_loss_and_gradients(baseline, other, seed=7)


def test_blocks_stay_packed_on_every_tier(prepared):
    model_dir, q = prepared
    for offload in ('ram', 'device'):
        store = slowllama.load(model_dir, offload=offload).store
        held = store._resident['block_000.safetensors']
        assert held['self_attn.q_proj.qweight'].dtype == torch.uint8
        assert 'self_attn.q_proj.weight' not in held
    manifest = json.loads((model_dir / 'manifest.json').read_text())
    assert manifest['quant'] == q.to_dict()
    block = SafetensorsFile(model_dir / 'block_000.safetensors')
    assert block.tensor('input_layernorm.weight').dtype == torch.float32  # norms stay in the model's dtype


def test_packed_weights_are_the_source_quantized(prepared, quant_hf):
    """What the store hands the engine is exactly quantize-then-dequantize of the source weight."""
    model_dir, q = prepared
    _, hf_model = quant_hf
    store = slowllama.load(model_dir, offload='disk').store
    block = store.block(1)
    for name in ('self_attn.k_proj.weight', 'mlp.down_proj.weight'):
        source = hf_model.state_dict()[f'model.layers.1.{name}']
        assert torch.equal(block[name], quant.dequantize(quant.quantize(source, q), tuple(source.shape), q))
    store.release(1)


def test_block_files_and_plan_count_packed_bytes(prepared, quant_hf, tmp_path):
    from slowllama.engine.plan import block_bytes
    model_dir, q = prepared
    hf_folder, _ = quant_hf
    slowllama.prepare(hf_folder, tmp_path / 'bf16', dtype='bf16')
    cfg = slowllama.load(model_dir).cfg
    manifest = json.loads((model_dir / 'manifest.json').read_text())
    packed = manifest['files']['block_000.safetensors']['size']
    plain = json.loads((tmp_path / 'bf16' / 'manifest.json').read_text())['files']['block_000.safetensors']['size']
    header = SafetensorsFile(model_dir / 'block_000.safetensors').data_start
    assert packed - header == block_bytes(cfg, 'fp32', q)
    assert block_bytes(cfg, 'bf16', q) / block_bytes(cfg, 'bf16') < (0.30 if q.type == 'nf4' else 0.55)
    print(f'\n{q}: block file {packed} bytes, bf16 {plain}')


def test_gguf_q8_0_carried_over_bit_for_bit(quant_hf, tmp_path):
    """A GGUF whose projections are Q8_0 prepared with --quant int8: the blocks' bytes are the
    file's (q and k rows un-permuted whole), and they dequantize to what gguf gives."""
    import gguf
    T = gguf.GGMLQuantizationType
    _, hf_model = quant_hf
    expected = write_gguf(tmp_path / 'm.gguf', hf_model, {'*': T.Q8_0, 'attn_v.weight': T.F16})
    slowllama.prepare(tmp_path / 'm.gguf', tmp_path / 'int8', dtype='fp32', quant='int8')
    reader = gguf.GGUFReader(str(tmp_path / 'm.gguf'))
    raw = {t.name: np.array(t.data) for t in reader.tensors}
    block = SafetensorsFile(tmp_path / 'int8' / 'block_001.safetensors')
    assert np.array_equal(block.tensor('mlp.down_proj.qweight').numpy(), raw['blk.1.ffn_down.weight'])
    store = slowllama.load(tmp_path / 'int8').store
    weights = store.block(1)
    for ours, name in (('self_attn.q_proj.weight', 'attn_q'), ('self_attn.k_proj.weight', 'attn_k'),
                       ('mlp.gate_proj.weight', 'ffn_gate'), ('self_attn.v_proj.weight', 'attn_v')):
        want = torch.from_numpy(np.asarray(expected[f'blk.1.{name}.weight'], dtype=np.float32))
        if name == 'attn_v':  # F16 in the file: quantized once, from its values
            want = quant.dequantize(quant.quantize(want, Quant('int8')), tuple(want.shape), Quant('int8'))
        assert torch.equal(weights[ours], want), ours


def test_unsupported_quant_and_unquantizable_shapes_write_nothing(quant_hf, tmp_path, capsys):
    hf_folder, _ = quant_hf
    assert cli.main(['prepare', str(hf_folder), str(tmp_path / 'out'), '--quant', 'q3_k']) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and '--quant' in err[0] and 'q3_k' in err[0]
    assert cli.main(['prepare', str(hf_folder), str(tmp_path / 'out'), '--quant', 'int8', '--double-quant']) != 0
    make_hf_model(tmp_path / 'odd', seed=1, intermediate_size=80)  # down_proj rows of 80: no Q8_0 blocks
    with pytest.raises(slowllama.SlowLlamaError, match='^quant int8: .*mlp.down_proj.weight has shape'):
        slowllama.prepare(tmp_path / 'odd', tmp_path / 'out', quant='int8')
    assert sorted(os.listdir(tmp_path)) == ['odd']  # no output, no staging folder left


def test_packed_part_of_the_wrong_size_is_refused(prepared, tmp_path):
    """A block file whose packed part does not match its weight's shape (checksums made to agree,
    as a buggy tool would leave it) is refused with one line naming the file, by load and by export."""
    import shutil
    model_dir, _ = prepared
    broken = tmp_path / 'broken'
    shutil.copytree(model_dir, broken)
    path = broken / 'block_002.safetensors'
    tensors = {k: v.clone() for k, v in SafetensorsFile(path).tensors().items()}
    tensors['mlp.up_proj.qweight'] = tensors['mlp.up_proj.qweight'][:-1]
    manifest = json.loads((broken / 'manifest.json').read_text())
    manifest['files'][path.name] = {'sha256': write_safetensors(path, tensors), 'size': os.path.getsize(path)}
    write_json(broken / 'manifest.json', manifest)
    assert sha256_file(path) == manifest['files'][path.name]['sha256']
    with pytest.raises(slowllama.SlowLlamaError, match='block_002.safetensors: mlp.up_proj.qweight'):
        slowllama.load(broken, offload='ram')
    from slowllama.weights.formats.export import export
    with pytest.raises(slowllama.SlowLlamaError, match='block_002.safetensors: mlp.up_proj.qweight'):
        export(broken, tmp_path / 'out', 'hf')
    assert not (tmp_path / 'out').exists()


@pytest.mark.slow
def test_finetune_resume_generate_and_export_on_nf4(quant_hf, tmp_path, capsys):
    """The commands on an nf4 model: prepare --quant, finetune with dropout, resume after a lost
    checkpoint to the same adapter bytes, test_gen, export hf (dequantized + merged, loadable by
    transformers, same logits) and peft (onto the base quantized by bitsandbytes, same logits)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    hf_folder, _ = quant_hf
    model_dir, run_dir = tmp_path / 'nf4', tmp_path / 'run'
    assert cli.main(['prepare', str(hf_folder), str(model_dir), '--quant', 'nf4', '--dtype', 'fp32']) == 0
    finetune_and_resume(model_dir, run_dir, tmp_path, ['--dropout', '0.1', '--targets', 'q,v,down', '--val-fraction',
                                                       '0.2', '--eval-every', '2', '--prompt', 'the',
                                                       '--max-new-tokens', '3'])
    ours = slowllama.load(model_dir, adapter=run_dir / 'adapter')
    tokens, _ = random_batch(ours.cfg.vocab_size, seed=9)
    logits = ours.logits(tokens)
    assert cli.main(['export', '--model', str(model_dir), '--lora', str(run_dir / 'adapter'), '--format', 'hf',
                     '--out', str(tmp_path / 'hf_out'), '--dtype', 'fp32']) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / 'hf_out', dtype=torch.float32).eval()
    with torch.no_grad():
        assert (merged(input_ids=tokens).logits - logits).abs().max() < 1e-4
    assert cli.main(['export', '--model', str(model_dir), '--lora', str(run_dir / 'adapter'), '--format', 'peft',
                     '--out', str(tmp_path / 'peft_out')]) == 0
    qlora = PeftModel.from_pretrained(bnb_base(hf_folder), tmp_path / 'peft_out').eval()
    with torch.no_grad():
        assert (qlora(input_ids=tokens).logits - logits).abs().max() < 1e-4

    assert_test_gen_is_greedy(qlora, model_dir, run_dir, capsys)


def finetune_and_resume(model_dir, run_dir, tmp_path, extra):
    """finetune 4 steps with LoRA dropout, then again with --resume after the last checkpoint is lost:
    the same adapter bytes."""
    import shutil
    story = tmp_path / 'story.txt'
    story.write_text('odalys brenn keeps the violet lamp burning every night. ships at sea look for the light. ' * 8)
    args = ['finetune', '--model', str(model_dir), '--data', str(story), '--out', str(run_dir), '--iters', '4',
            '--seq-len', '16', '--batch-size', '2', '--lr', '1e-2', '--lora-dropout', '0.1', '--save-every', '2',
            *extra]
    assert cli.main(args) == 0
    adapter = (run_dir / 'adapter' / 'adapter_model.safetensors').read_bytes()
    shutil.rmtree(run_dir / 'checkpoints' / 'step_000004')
    assert cli.main(args + ['--resume']) == 0
    assert (run_dir / 'adapter' / 'adapter_model.safetensors').read_bytes() == adapter


def assert_test_gen_is_greedy(reference, model_dir, run_dir, capsys):
    """test_gen with the run's adapter prints what `reference` (a transformers model) decodes greedily."""
    from slowllama.tokenizer.tokenizer import load_tokenizer
    tokenizer = load_tokenizer(model_dir)
    ids = torch.tensor([tokenizer.encode('the violet')])
    want = reference.generate(ids, max_new_tokens=6, do_sample=False, attention_mask=torch.ones_like(ids),
                              pad_token_id=3)[0, ids.shape[1]:]
    capsys.readouterr()
    assert cli.main(['test_gen', str(model_dir), '--lora', str(run_dir), '--prompt', 'the violet',
                     '--max-new-tokens', '6']) == 0
    assert capsys.readouterr().out.strip() == tokenizer.decode(want.tolist()).strip()


# --- --quant-head: the embeddings and head packed too ---------------------------------------------

@pytest.fixture(scope='module', params=['nf4', 'nf4-dq', 'int8-tied'])
def head_packed(request, tmp_path_factory):
    """(prepared folder, Quant, transformers model): tables packed with --quant-head, fp32 norms;
    int8 on a model whose head is its embeddings."""
    folder = tmp_path_factory.mktemp('hf_head')
    tied = request.param.endswith('tied')
    # rows of 192: three nf4 blocks a row, and (double quant) absmax in two blocks of 256
    hf_model = make_hf_model(folder, seed=6, bos_token_id=1, eos_token_id=2, pad_token_id=3,
                             tie_word_embeddings=tied, hidden_size=192, **QUANT_TINY)
    save_tiny_tokenizer(folder)
    q = Quant('int8' if tied else 'nf4', request.param == 'nf4-dq', head=True)
    out = tmp_path_factory.mktemp('prepared_head') / 'model'
    slowllama.prepare(folder, out, dtype='fp32', quant=q)
    return out, q, hf_model


def packed_table(hf_model, name, q):
    """The transformers model's table quantized and dequantized: what --quant-head holds."""
    source = hf_model.state_dict()[name]
    return quant.dequantize(quant.quantize(source, q), tuple(source.shape), q)


def test_quant_head_holds_the_tables_packed_and_reads_their_rows(head_packed):
    model_dir, q, hf_model = head_packed
    embed = SafetensorsFile(model_dir / 'embed.safetensors')
    assert 'embed_tokens.weight' not in embed.names() and embed.tensor('embed_tokens.qweight').dtype == torch.uint8
    head = SafetensorsFile(model_dir / 'head.safetensors')
    assert head.tensor('norm.weight').dtype == torch.float32
    assert ('lm_head.qweight' in head.names()) != hf_model.config.tie_word_embeddings
    assert json.loads((model_dir / 'manifest.json').read_text())['quant']['head'] is True
    table = packed_table(hf_model, 'model.embed_tokens.weight', q)
    head_table = table if hf_model.config.tie_word_embeddings else packed_table(hf_model, 'lm_head.weight', q)
    tokens = torch.tensor([[5, 0, 127, 5], [64, 3, 9, 126]])
    for offload in ('disk', 'ram', 'device'):
        store = slowllama.load(model_dir, offload=offload).store
        assert torch.equal(store.embed(tokens), table[tokens])
        assert torch.equal(store.head_rows(32, 96), head_table[32:96])
        store.release_head_rows(32, 96)


def test_quant_head_equals_transformers_peft_on_the_packed_tables(tmp_path):
    """Logits, loss and every LoRA gradient, LoRA dropout 0.1, against QLoRA as transformers + peft +
    bitsandbytes run it, its embeddings and head set to what --quant-head holds."""
    folder = tmp_path / 'hf'
    hf_model = make_hf_model(folder, seed=6, bos_token_id=1, eos_token_id=2, pad_token_id=3, **QUANT_TINY)
    save_tiny_tokenizer(folder)
    q = Quant('nf4', head=True)
    model_dir = slowllama.prepare(folder, tmp_path / 'nf4', dtype='fp32', quant=q)
    reference = bnb_qlora(folder, lora_dropout=0.1)
    with torch.no_grad():
        base = reference.base_model.model
        base.model.embed_tokens.weight.copy_(packed_table(hf_model, 'model.embed_tokens.weight', q))
        base.lm_head.weight.copy_(packed_table(hf_model, 'lm_head.weight', q))
    reference.save_pretrained(tmp_path / 'adapter')
    ours = slowllama.load(model_dir, adapter=tmp_path / 'adapter', lora=slowllama.LoraConfig(dropout=0.1))
    tokens, targets = random_batch(ours.cfg.vocab_size, seed=3)
    _, logit_diff, loss, ref_loss = step_beside_peft(ours, reference, tokens, targets)
    ref_grads = peft_grads(reference)
    grads = {k: p.grad for k, p in ours.trainable_parameters().items()}
    worst = max(max_rel_diff(grads[k], ref_grads[k]) for k in grads)
    assert logit_diff < 1e-4 and abs(loss - ref_loss.item()) < 1e-5 and worst < 1e-5


@pytest.mark.parametrize('offload', ['ram', 'device'])
def test_quant_head_tiers_give_identical_gradients(head_packed, offload):
    model_dir, _, _ = head_packed
    lora = slowllama.LoraConfig(rank=4, dropout=0.1, targets=('q', 'v', 'down'))
    baseline = slowllama.load(model_dir, lora=lora, offload='disk', dropout=0.1)
    other = slowllama.load(model_dir, lora=lora, offload=offload, dropout=0.1)
    assert_same_loss_and_gradients(baseline, other, seed=7)


def test_quant_head_exports_the_unpacked_tables_and_counts_their_bytes(head_packed, tmp_path):
    from safetensors.torch import load_file

    from slowllama.engine.plan import table_bytes
    from slowllama.weights.formats.export import export
    model_dir, q, hf_model = head_packed
    export(model_dir, tmp_path / 'hf', 'hf', dtype='fp32')
    tensors = {}
    for path in sorted((tmp_path / 'hf').glob('*.safetensors')):
        tensors |= load_file(path)
    assert torch.equal(tensors['model.embed_tokens.weight'], packed_table(hf_model, 'model.embed_tokens.weight', q))
    cfg = slowllama.load(model_dir).cfg
    packed = [SafetensorsFile(model_dir / f).tensors() for f in ('embed.safetensors', 'head.safetensors')]
    assert table_bytes(cfg, 'fp32', q) == sum(t.nbytes for ts in packed for name, t in ts.items() if name != 'norm.weight')
    assert table_bytes(cfg, 'bf16', q) < 0.6 * table_bytes(cfg, 'bf16')


def test_quant_head_without_quant_or_with_rows_that_split_blocks_is_refused(quant_hf, tmp_path, capsys):
    hf_folder, _ = quant_hf
    assert cli.main(['prepare', str(hf_folder), str(tmp_path / 'out'), '--quant-head']) != 0
    assert 'error: --quant-head' in capsys.readouterr().err and not (tmp_path / 'out').exists()
    with pytest.raises(slowllama.SlowLlamaError, match='^quant_head: .* rows of 96 values'):
        quant.check_quantizable((128, 96), Quant('nf4', head=True), 'embed_tokens.weight', rows=True)


@pytest.mark.slow
def test_finetune_resume_generate_and_export_with_quant_head(quant_hf, tmp_path, capsys):
    """The commands on a model whose tables are packed too: prepare --quant-head, finetune, resume to
    the same adapter bytes, test_gen as greedy decoding of the same logits, export hf (the unpacked
    tables with the merged blocks, loadable by transformers, same logits)."""
    from transformers import AutoModelForCausalLM

    hf_folder, _ = quant_hf
    model_dir, run_dir = tmp_path / 'nf4', tmp_path / 'run'
    assert cli.main(['prepare', str(hf_folder), str(model_dir), '--quant', 'nf4', '--double-quant',
                     '--quant-head', '--dtype', 'fp32']) == 0
    finetune_and_resume(model_dir, run_dir, tmp_path, ['--targets', 'q,v'])
    assert cli.main(['export', '--model', str(model_dir), '--lora', str(run_dir / 'adapter'), '--format', 'hf',
                     '--out', str(tmp_path / 'hf_out'), '--dtype', 'fp32']) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / 'hf_out', dtype=torch.float32).eval()
    ours = slowllama.load(model_dir, adapter=run_dir / 'adapter')
    tokens, _ = random_batch(ours.cfg.vocab_size, seed=9)
    with torch.no_grad():
        assert (merged(input_ids=tokens).logits - ours.logits(tokens)).abs().max() < 1e-4
    assert_test_gen_is_greedy(merged, model_dir, run_dir, capsys)
