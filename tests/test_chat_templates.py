"""Chat templates: prepare carries them from wherever a source keeps them, to where transformers looks;
rendering equals transformers' apply_chat_template token for token on every family's template; a
template that fails is one line naming the record and the template's own message."""
import json
import shutil

import pytest
from chat_families import CONVERSATIONS, FAMILIES, conversations, family_tokenizer, trl_template
from checkpoints import write_gguf
from conftest import make_hf_model

import slowllama
from slowllama import cli
from slowllama.tokenizer.tokenizer import load_tokenizer
from slowllama.weights.formats.export import export

CONVERSATION_TEXTS = [m['content'] for messages in CONVERSATIONS for m in messages]
TOOLS = [{'type': 'function', 'function': {
    'name': 'light_lamp', 'description': 'Light the lamp <now> & "quickly"',
    'parameters': {'type': 'object', 'properties': {'colour': {'type': 'string', 'enum': ['violet', 'white']}},
                   'required': ['colour']}}}]


def hf_ids(hf_tokenizer, messages, add_generation_prompt, **kwargs):
    return hf_tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True,
                                            return_dict=False, **kwargs)


# --- where the template comes from ----------------------------------------------------------------

def save_source(layout, folder):
    """A transformers-saved folder whose templates sit as `layout` says; -> what transformers reads
    from it ({name: template}; for chat_template.json, which tokenizers do not read, its content)."""
    tokenizer = family_tokenizer('qwen2.5')
    named = {'default': trl_template('qwen2_5'), 'tool_use': trl_template('qwen3')}
    if layout.endswith('named'):
        tokenizer.chat_template = named
    tokenizer.save_pretrained(folder, save_jinja_files=layout.startswith('jinja') or layout == 'json')
    make_hf_model(folder, seed=4, model_type='qwen2', vocab_size=len(tokenizer))
    if layout == 'json':  # a processor's chat_template.json instead of the .jinja file
        (folder / 'chat_template.json').write_text(json.dumps({'chat_template': trl_template('qwen2_5')}))
        (folder / 'chat_template.jinja').unlink()
        return {'default': trl_template('qwen2_5')}
    return named if layout.endswith('named') else {'default': trl_template('qwen2_5')}


@pytest.mark.parametrize('layout', ['jinja', 'jinja named', 'config', 'config named', 'json'])
def test_prepare_carries_the_templates_to_where_transformers_looks(layout, tmp_path):
    from transformers import AutoTokenizer
    expected = save_source(layout, tmp_path / 'src')
    stored = (tmp_path / 'src' / 'tokenizer_config.json').read_text()
    assert ('chat_template' in stored) == layout.startswith('config')  # the layout is what it says
    if layout != 'json':
        read = AutoTokenizer.from_pretrained(tmp_path / 'src').chat_template
        assert (read if isinstance(read, dict) else {'default': read}) == expected
    slowllama.prepare(tmp_path / 'src', tmp_path / 'prepared', dtype='fp32')
    ours = load_tokenizer(tmp_path / 'prepared')
    assert ours.chat_templates == expected and ours.chat_template == expected['default']
    assert 'chat_template' not in json.loads((tmp_path / 'prepared' / 'tokenizer_config.json').read_text())
    export(tmp_path / 'prepared', tmp_path / 'exported', 'hf')
    for folder in ('prepared', 'exported'):  # transformers reads the same templates from both
        reference = AutoTokenizer.from_pretrained(tmp_path / folder)
        assert reference.chat_template == (expected if len(expected) > 1 else expected['default'])
        for messages in CONVERSATIONS:
            assert ours.encode_chat(messages, True) == hf_ids(reference, messages, True)
    if len(expected) > 1:  # with tools, transformers and we pick the tool_use template
        assert ours.encode_chat(CONVERSATIONS[2], True, tools=TOOLS) == hf_ids(reference, CONVERSATIONS[2], True,
                                                                                tools=TOOLS)
        assert ours.apply_chat_template(CONVERSATIONS[2], tools=TOOLS).startswith('<|im_start|>system\n# Tools')


def gguf_tokenizer_fields(hf_tokenizer):
    """llama.cpp's gpt2 tokenizer metadata for a byte-level BPE (written with gguf's writer)."""
    backend = json.loads(hf_tokenizer.backend_tokenizer.to_str())
    vocab = hf_tokenizer.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    specials = set(hf_tokenizer.all_special_tokens) | {t.content for t in hf_tokenizer.added_tokens_decoder.values()}
    return {'add_tokenizer_model': 'gpt2', 'add_tokenizer_pre': 'default', 'add_token_list': tokens,
            'add_token_types': [3 if t in specials else 1 for t in tokens],
            'add_token_merges': [' '.join(m) if isinstance(m, list) else m for m in backend['model']['merges']],
            'add_eos_token_id': vocab['<|im_end|>'], 'add_add_bos_token': False}


def test_prepare_carries_a_ggufs_default_and_named_templates(tmp_path):
    from transformers import AutoTokenizer
    hf_tokenizer = family_tokenizer('qwen2.5')
    named = {'default': trl_template('qwen2_5'), 'tool_use': trl_template('qwen3')}
    fields = gguf_tokenizer_fields(hf_tokenizer)
    fields['add_chat_template'] = [{'name': name, 'template': t} for name, t in named.items()]
    hf_model = make_hf_model(tmp_path / 'hf', seed=5, vocab_size=len(hf_tokenizer))
    write_gguf(tmp_path / 'm.gguf', hf_model, {}, tokenizer=fields)
    slowllama.prepare(tmp_path / 'm.gguf', tmp_path / 'prepared', dtype='fp32')
    assert load_tokenizer(tmp_path / 'prepared').chat_templates == named
    assert AutoTokenizer.from_pretrained(tmp_path / 'prepared').chat_template == named
    assert sorted(p.name for p in (tmp_path / 'prepared' / 'additional_chat_templates').iterdir()) == ['tool_use.jinja']
    export(tmp_path / 'prepared', tmp_path / 'again.gguf', 'gguf')  # and back into a GGUF, as llama.cpp keeps them
    import gguf
    fields = gguf.GGUFReader(str(tmp_path / 'again.gguf')).fields
    assert fields['tokenizer.chat_template'].contents() == named['default']
    assert fields['tokenizer.chat_templates'].contents() == ['tool_use']
    assert fields['tokenizer.chat_template.tool_use'].contents() == named['tool_use']


# --- rendering equals transformers ------------------------------------------------------------------

@pytest.mark.parametrize('name', list(FAMILIES))
def test_rendering_equals_transformers_apply_chat_template(chat_family, name):
    """System turn, several turns, with and without the generation prompt: the same token ids as
    transformers on the folder it saved, and as transformers on our prepared folder."""
    from transformers import AutoTokenizer
    hf_folder, prepared, _ = chat_family(name)
    ours = load_tokenizer(prepared)
    references = [AutoTokenizer.from_pretrained(hf_folder), AutoTokenizer.from_pretrained(prepared)]
    for messages in conversations(name):
        for generation_prompt in (False, True):
            ids = ours.encode_chat(messages, generation_prompt)
            assert all(ids == hf_ids(reference, messages, generation_prompt) for reference in references), name
    assert len({tuple(ours.encode_chat(m)) for m in conversations(name)}) == len(conversations(name))


@pytest.mark.parametrize('name, kwargs', [
    ('llama3.2', {'tools': TOOLS}),                      # tojson(indent=4), strftime_now for today's date
    ('qwen2.5', {'tools': TOOLS}),                       # tojson without HTML escapes
    ('llama3.2', {'tools': TOOLS, 'tools_in_user_message': False, 'date_string': '1 Jan 2025'}),
    ('qwen3', {'enable_thinking': False}),
])
def test_tools_and_extra_variables_render_as_transformers(chat_family, name, kwargs):
    from transformers import AutoTokenizer
    hf_folder, prepared, _ = chat_family(name)
    ours, reference = load_tokenizer(prepared), AutoTokenizer.from_pretrained(hf_folder)
    messages = CONVERSATIONS[0]
    assert ours.encode_chat(messages, True, **kwargs) == hf_ids(reference, messages, True, **kwargs)
    assert ours.encode_chat(messages, True, **kwargs) != ours.encode_chat(messages, True)  # they matter


def test_reasoning_and_null_fields_reach_the_template_as_in_transformers(chat_family):
    from transformers import AutoTokenizer
    hf_folder, prepared, _ = chat_family('qwen3')
    ours, reference = load_tokenizer(prepared), AutoTokenizer.from_pretrained(hf_folder)
    messages = [{'role': 'user', 'content': 'who keeps the lamp?'},
                {'role': 'assistant', 'content': 'odalys brenn', 'reasoning': 'the keeper is named in the log'}]
    assert ours.encode_chat(messages) == hf_ids(reference, messages, False)
    assert 'the keeper is named' in ours.apply_chat_template(messages)
    hf_folder, prepared, _ = chat_family('llama3.2')  # its template asks `'tool_calls' in message`
    ours, reference = load_tokenizer(prepared), AutoTokenizer.from_pretrained(hf_folder)
    messages = [{'role': 'user', 'content': 'who keeps the lamp?'},
                {'role': 'assistant', 'content': 'odalys brenn', 'tool_calls': None}]  # as OpenAI's API writes it
    assert ours.encode_chat(messages) == hf_ids(reference, messages, False)


# Zephyr's template (HuggingFaceH4/zephyr-7b-beta): block tags on lines of their own, which only
# trim_blocks keeps out of the text; the same indented, which only lstrip_blocks keeps out too
ZEPHYR = ("{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + "
          "eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}"
          "\n{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
          "{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}")


@pytest.mark.parametrize('template', [ZEPHYR, ZEPHYR.replace('\n{%', '\n    {%')])
def test_block_tags_on_their_own_lines_render_as_in_transformers(chat_family, tmp_path, template):
    from transformers import AutoTokenizer
    hf_folder, prepared, _ = chat_family('phi3')
    (tmp_path / 'zephyr.jinja').write_text(template)
    ours, reference = load_tokenizer(prepared), AutoTokenizer.from_pretrained(hf_folder)
    ours.use_chat_template(str(tmp_path / 'zephyr.jinja'))
    for messages in CONVERSATIONS:
        assert ours.encode_chat(messages, True) == hf_ids(reference, messages, True, chat_template=template)
    rendered = ours.apply_chat_template(CONVERSATIONS[1])
    assert rendered.startswith('<|user|>\nthe quick brown fox<|endoftext|>\n<|assistant|>')


# --- templates that fail ------------------------------------------------------------------------------

def finetune_chat(model_dir, data, tmp_path, *flags):
    return cli.main(['finetune', '--model', str(model_dir), '--data', str(data), '--out', str(tmp_path / 'run'),
                     '--iters', '1', '--seq-len', '64', '--device', 'cpu', *flags])


@pytest.mark.parametrize('template, parts', [
    (None, ('record 2: the chat template (', 'chat_template.jinja) fails: After the optional system message, '
            'conversation roles must alternate user/assistant/user/assistant/...\n')),  # raise_exception
    ("{{ messages[0]['content'] + messages[1].nope.deeper }}",
     ('record 1: the chat template (', "template.jinja) fails: 'dict object' has no attribute 'nope'\n")),
    ('{% for m in messages %}{{ m.content }', ('template.jinja: the chat template does not parse (line 1: ',)),
])
def test_a_template_that_fails_is_one_line_naming_the_record(chat_family, tmp_path, capsys, template, parts):
    _, prepared, _ = chat_family('mistral')
    data = tmp_path / 'chat.jsonl'
    records = [CONVERSATIONS[1], [{'role': 'user', 'content': 'one'}, {'role': 'user', 'content': 'two'},
                                  {'role': 'assistant', 'content': 'three'}]]
    data.write_text(''.join(json.dumps({'messages': m}) + '\n' for m in records))
    flags = []
    if template:
        (tmp_path / 'template.jinja').write_text(template)
        flags = ['--chat-template', str(tmp_path / 'template.jinja')]
    assert finetune_chat(prepared, data, tmp_path, *flags) == 2
    err = capsys.readouterr().err
    assert err.startswith('error: ') and err.count('\n') == 1 and 'Traceback' not in err, err
    assert all(part in err for part in parts), err
    assert not (tmp_path / 'run' / 'adapter').exists()


def test_the_manifest_lists_named_templates_in_their_folder_only(tmp_path):
    from slowllama.weights.prepared import _inside
    assert _inside('chat_template.jinja') and _inside('additional_chat_templates/tool_use.jinja')
    assert not any(_inside(name) for name in ('../x.jinja', 'a/../../x', '/etc/passwd', 'a/b/c.jinja', 'a//b',
                                              './x', 'a\\..\\x'))


def test_a_chat_template_flag_picks_a_named_template_or_a_file(chat_family, tmp_path):
    _, prepared, _ = chat_family('phi3')
    copy = tmp_path / 'model'
    shutil.copytree(prepared, copy)
    tokenizer = load_tokenizer(copy)
    with pytest.raises(slowllama.SlowLlamaError, match='nothing.jinja: chat template not found'):
        tokenizer.use_chat_template(str(tmp_path / 'nothing.jinja'))
    (tmp_path / 't.jinja').write_text('{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}')
    tokenizer.use_chat_template(str(tmp_path / 't.jinja'))
    rendered = tokenizer.apply_chat_template(CONVERSATIONS[1])
    assert rendered == '[user]the quick brown fox[assistant]jumps over the lazy dog'
    tokenizer.chat_templates['short'] = '{{ messages | length }}'
    tokenizer.use_chat_template('short')
    assert tokenizer.apply_chat_template(CONVERSATIONS[1]) == '2'


def test_a_sentencepiece_tokenizer_reads_the_special_tokens_a_template_spells(tmp_path):
    """tokenizer.model alone (as prepared from a Llama-2 / Mistral GGUF): '<s>' and '</s>' in the
    rendered text are their ids, as transformers' LlamaTokenizer encodes the same folder."""
    import sentencepiece
    from test_tokenizer import CORPUS as TEXTS
    from test_tokenizer import sentencepiece_gguf_fields
    from transformers import AutoTokenizer
    folder = tmp_path / 'sp'
    folder.mkdir()
    (folder / 'corpus.txt').write_text('\n'.join(TEXTS + CONVERSATION_TEXTS))
    sentencepiece.SentencePieceTrainer.train(
        input=str(folder / 'corpus.txt'), model_prefix=str(folder / 'tokenizer'), vocab_size=320, model_type='bpe',
        byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=3, minloglevel=2,
        normalization_rule_name='identity', remove_extra_whitespaces=False)
    (folder / 'tokenizer_config.json').write_text(json.dumps(
        {'bos_token': '<s>', 'eos_token': '</s>', 'unk_token': '<unk>', 'tokenizer_class': 'LlamaTokenizer'}))
    (folder / 'chat_template.jinja').write_text(FAMILIES['mistral'].template)
    reference = AutoTokenizer.from_pretrained(folder)
    fields = sentencepiece_gguf_fields(folder / 'tokenizer.model')
    fields['add_chat_template'] = FAMILIES['mistral'].template
    write_gguf(tmp_path / 'm.gguf', make_hf_model(tmp_path / 'hf', seed=6, vocab_size=320), {}, tokenizer=fields)
    slowllama.prepare(tmp_path / 'm.gguf', tmp_path / 'prepared', dtype='fp32')
    for ours in (load_tokenizer(folder), load_tokenizer(tmp_path / 'prepared')):
        assert ours.kind == 'sentencepiece'
        for messages in CONVERSATIONS[1:]:
            ids = ours.encode_chat(messages, True)
            assert ids == hf_ids(reference, messages, True) and ids[0] == 1 and ids.count(2) == 1
