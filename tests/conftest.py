"""Fixtures: tiny random Llamas saved by transformers, and their prepared twins."""
import pytest
import torch

import slowllama

TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=128, max_position_embeddings=256, rms_norm_eps=1e-5)


def make_hf_model(folder, seed=0, max_shard_size=None, model_type='llama', **overrides):
    """Save a random transformers model of `model_type` (LlamaForCausalLM by default; weights and
    biases perturbed from their init so every tensor matters)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    torch.manual_seed(seed)
    config = AutoConfig.for_model(model_type, **{**TINY, **overrides})
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if 'norm' in name:
                param.copy_(1.0 + 0.2 * torch.randn_like(param))
            else:
                param.normal_(0.0, 0.15)
    kwargs = {'max_shard_size': max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, **kwargs)
    return model


@pytest.fixture(scope='session', params=['untied', 'tied'])
def tiny_hf(request, tmp_path_factory):
    """(hf folder, transformers model): GQA, untied (sharded with an index) and tied."""
    folder = tmp_path_factory.mktemp(f'hf_{request.param}')
    if request.param == 'tied':
        model = make_hf_model(folder, seed=1, tie_word_embeddings=True)
    else:
        model = make_hf_model(folder, seed=2, max_shard_size='100KB')
    return folder, model


@pytest.fixture(scope='session')
def tiny_prepared(tiny_hf, tmp_path_factory):
    """(prepared folder, hf folder, transformers model), prepared in fp32."""
    hf_folder, model = tiny_hf
    out = tmp_path_factory.mktemp('prepared') / 'model'
    slowllama.prepare(hf_folder, out, dtype='fp32')
    return out, hf_folder, model


def random_batch(vocab, batch=2, seq=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (batch, seq), generator=g)
    targets = torch.cat([tokens[:, 1:], torch.full((batch, 1), -100)], dim=1)
    targets[0, :3] = -100  # some ignored positions, as a prompt mask would make
    return tokens, targets


# --- a tiny model with a real tokenizer (data, train, CLI and test_gen tests) --------------------

CORPUS = [
    'the quick brown fox jumps over the lazy dog', 'a lighthouse keeper lives on the island of varrow',
    'odalys brenn keeps the violet lamp burning every night', 'ships at sea look for the light',
    'instruction input output response user assistant', 'one two three four five six seven eight nine ten',
]
SPECIAL_TOKENS = ['<unk>', '<s>', '</s>', '<pad>', '<|user|>', '<|assistant|>', '<|end|>']
CHAT_TEMPLATE = ("{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + '<|end|>' }}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")


def save_tiny_tokenizer(folder, vocab_size=128, chat_template=CHAT_TEMPLATE):
    """A BPE trained on CORPUS (ids 0..6 are the special tokens) with tokenizer_config.json."""
    import json
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tokenizer = Tokenizer(models.BPE(unk_token='<unk>'))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False)
    tokenizer.train_from_iterator(CORPUS, trainer)
    tokenizer.save(str(folder / 'tokenizer.json'))
    config = {'bos_token': '<s>', 'eos_token': '</s>', 'pad_token': '<pad>', 'add_bos_token': True}
    if chat_template:
        config['chat_template'] = chat_template
    (folder / 'tokenizer_config.json').write_text(json.dumps(config))
    return tokenizer


@pytest.fixture(scope='session')
def tiny_text_model(tmp_path_factory):
    """(prepared folder, hf folder, transformers model): untied, bos 1, eos 2, pad 3, with a tokenizer."""
    hf_folder = tmp_path_factory.mktemp('hf_text')
    model = make_hf_model(hf_folder, seed=3, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    save_tiny_tokenizer(hf_folder)
    out = tmp_path_factory.mktemp('prepared_text') / 'model'
    slowllama.prepare(hf_folder, out, dtype='fp32')
    return out, hf_folder, model


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` run where a CUDA device is (`pytest -m cuda` runs only them) and are
    skipped elsewhere, visibly, with the reason 'no cuda'."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason='no cuda')
    for item in items:
        if 'cuda' in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope='session')
def fuzz_corpus(tmp_path_factory):
    """Valid files of every kind slowllama reads (tests/fuzz.py), for the fuzz and kill tests."""
    import fuzz
    return fuzz.build_corpus(tmp_path_factory.mktemp('fuzz_corpus'))


@pytest.fixture(scope='session')
def chat_family(tmp_path_factory):
    """name -> (hf folder, prepared folder, transformers model): a tiny model of each chat family
    (tests/chat_families.py), saved by transformers and prepared in fp32; built on first use."""
    from chat_families import save_family
    built = {}

    def get(name):
        if name not in built:
            folder = tmp_path_factory.mktemp(f'chat_{name}')
            _, model = save_family(name, folder / 'hf', seed=len(built))
            slowllama.prepare(folder / 'hf', folder / 'prepared', dtype='fp32')
            built[name] = (folder / 'hf', folder / 'prepared', model)
        return built[name]
    return get
