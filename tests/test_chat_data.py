"""Chat data: which tokens are learned equals trl's SFTTrainer with assistant_only_loss=True where trl
can compute it, and where it cannot (or differs) the test says why; a model without a chat template
never trains on plain lines silently; the run's first lines say which rendering the data used."""
import json

import pytest
from chat_families import CONVERSATIONS, FAMILIES, trl_template
from conftest import make_hf_model, save_tiny_tokenizer

import slowllama
from slowllama import cli
from slowllama.data.dataset import IGNORE, load_data
from slowllama.data.preference import load_pairs
from slowllama.tokenizer.tokenizer import load_tokenizer

TRAINED = [CONVERSATIONS[0], CONVERSATIONS[1]]  # conversations that end with an answer


def write_chat(path, conversations):
    path.write_text(''.join(json.dumps({'messages': m}) + '\n' for m in conversations))
    return path


def trl_rows(hf_folder, conversations, template_file=None):
    """(input_ids, trained positions) of each conversation as trl's SFTTrainer prepares and collates
    it with assistant_only_loss=True (trl swaps in its own training template when it knows the model's)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer
    tokenizer = AutoTokenizer.from_pretrained(hf_folder)
    if template_file:
        tokenizer.chat_template = template_file.read_text()
    config = SFTConfig(output_dir=str(hf_folder.parent / 'trl'), assistant_only_loss=True, max_length=None,
                       report_to=[], use_cpu=True)
    trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(hf_folder), args=config,
                         processing_class=tokenizer,
                         train_dataset=Dataset.from_list([{'messages': m} for m in conversations]))
    rows = []
    for row in trainer.train_dataset:
        labels = trainer.data_collator([row])['labels'][0].tolist()
        rows.append((row['input_ids'], {t for t, label in enumerate(labels) if label != IGNORE}))
    return rows


def mask_rows(hf_folder, conversations, template):
    """(input_ids, trained positions) of each conversation as transformers' apply_chat_template with
    return_assistant_tokens_mask marks it with `template` (position 0 is never a target)."""
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(hf_folder)
    rows = []
    for messages in conversations:
        out = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
        rows.append((out['input_ids'], {t for t, m in enumerate(out['assistant_masks']) if m and t > 0}))
    return rows


def our_rows(prepared, conversations, tmp_path, template_file=None):
    """(ids, trained positions) of each conversation as our data loader makes them: position t + 1
    is trained when targets[t] is not IGNORE (the model predicts token t + 1 at t)."""
    tokenizer = load_tokenizer(prepared)
    if template_file:
        tokenizer.use_chat_template(str(template_file))
    data = load_data(write_chat(tmp_path / 'chat.jsonl', conversations), tokenizer, seq_len=2048, batch_size=1)
    return [(e.tokens + [e.targets[-1]], {t + 1 for t, target in enumerate(e.targets) if target != IGNORE})
            for e in data.train.examples]


@pytest.mark.parametrize('name, training_template', [
    ('llama3', None), ('phi3', None),                        # trl's training template: same text, same turns
    ('qwen3', None),                                          # single-turn (multi-turn: see below)
    ('llama3', 'llama3_training'), ('qwen2.5', 'qwen2_5_training'), ('qwen3', 'qwen3_training'),
    ('phi3', 'phi3_training'),                                # {% generation %} marks: the same spans
])
def test_learned_tokens_equal_trl_assistant_only_loss(chat_family, tmp_path, name, training_template):
    hf_folder, prepared, _ = chat_family(name)
    conversations = [CONVERSATIONS[1]] if (name, training_template) == ('qwen3', None) else TRAINED
    template_file = None
    if training_template:
        template_file = tmp_path / f'{training_template}.jinja'
        template_file.write_text(trl_template(training_template))
    ours = our_rows(prepared, conversations, tmp_path, template_file)
    reference = trl_rows(hf_folder, conversations, template_file)
    assert ours == reference
    assert all(0 < len(trained) < len(ids) / 2 for ids, trained in ours)  # something learned, the prompt not


# a system message, then three answers
THREE = [{'role': 'system', 'content': 'you keep the lighthouse'}, *CONVERSATIONS[2],
         {'role': 'assistant', 'content': 'every night'}, {'role': 'user', 'content': 'the violet lamp?'},
         {'role': 'assistant', 'content': 'burning'}]


# answers with their reasoning (the templates render it in the last turn only, or never)
REASONED = [*CONVERSATIONS[0][:2], {**CONVERSATIONS[0][2], 'reasoning_content': 'the log names the keeper'},
            CONVERSATIONS[0][3], {**CONVERSATIONS[0][4], 'reasoning_content': 'ships at sea look for the light'}]


@pytest.mark.parametrize('name, template', [
    ('r1-llama', None), ('r1-qwen', None),   # the generation prompt ends in '<think>\n', the answers do not
    ('deepseekv3', None),
    ('nemotron', None), ('nemotron', 'nemotron_3_super'), ('nemotron', 'nemotron_3_ultra'),
    ('nemotron', 'nemotron_3_5_lightning'),  # '<|im_start|>assistant\n<think>\n' before '<think></think>answer'
    ('gptoss', None),                        # the last turn ends '<|return|>', the others '<|end|>'
])
def test_the_plain_template_learns_what_transformers_marks_on_trls_training_twin(chat_family, tmp_path, name,
                                                                                 template):
    """Each template as shipped, multi-turn with a system message, with reasoning (which Nemotron and
    gpt-oss render in the last turn only, the first answer rendered without it once more follows,
    an answer found by its content): the learned tokens are those that
    transformers' return_assistant_tokens_mask marks with trl's `_training` twin (its {% generation %}
    marks): each answer and its end of turn, every turn. gpt-oss's twin also marks each turn's
    '<|start|>assistant', the generation prompt the model is given (as Cohere's and SmolVLM's twins
    do not mark theirs): that is the one difference."""
    hf_folder, prepared, _ = chat_family(name)
    template = template or FAMILIES[name].template
    template_file = tmp_path / f'{template}.jinja'
    template_file.write_text(trl_template(template))
    conversations = [CONVERSATIONS[0], CONVERSATIONS[1], THREE, REASONED]
    ours = our_rows(prepared, conversations, tmp_path, template_file)
    reference = mask_rows(hf_folder, conversations, trl_template(f'{template}_training'))
    tokenizer = load_tokenizer(prepared)
    for messages, (ids, trained), (ref_ids, ref_trained) in zip(conversations, ours, reference):
        answers = [m['content'] for m in messages if m['role'] == 'assistant']
        learned = tokenizer.decode([ids[t] for t in sorted(trained)], skip_special=False)
        assert ids == ref_ids
        if name == 'gptoss':
            extra = sorted(ref_trained - trained)
            assert trained < ref_trained
            headers = tokenizer.decode([ids[t] for t in extra], skip_special=False)
            assert headers == '<|start|>assistant' * len(answers)
            ends = ['<|end|>'] * (len(answers) - 1) + ['<|return|>']
            thought = ('<|channel|>analysis<|message|>ships at sea look for the light<|end|><|start|>assistant'
                       if messages is REASONED else '')
            assert learned == ''.join(f'<|channel|>final<|message|>{a}{e}' for a, e in zip(answers, ends)) \
                .replace('<|channel|>final<|message|>they', f'{thought}<|channel|>final<|message|>they')
        else:
            assert trained == ref_trained
            prompts = [m['content'] for m in messages if m['role'] != 'assistant']
            assert all(a in learned for a in answers) and not any(p in learned for p in prompts)


def test_the_deepseek_r1_distills_learn_as_trls_sft_trainer(chat_family, tmp_path):
    """trl's SFTTrainer (assistant_only_loss) on an R1 distill swaps in its training twin; ours, on the
    template as shipped, learns the same tokens: '<｜Assistant｜>', the answer, '<｜end▁of▁sentence｜>'."""
    for name in ('r1-llama', 'r1-qwen'):
        hf_folder, prepared, _ = chat_family(name)
        ours, reference = our_rows(prepared, TRAINED, tmp_path), trl_rows(hf_folder, TRAINED)
        assert ours == reference, name
        tokenizer = load_tokenizer(prepared)
        ids, trained = ours[0]
        assert tokenizer.decode([ids[t] for t in sorted(trained)], skip_special=False) == (
            '<｜Assistant｜>odalys brenn keeps it<｜end▁of▁sentence｜><｜Assistant｜>they look for the light'
            '<｜end▁of▁sentence｜>')


def test_where_trl_cannot_compute_the_mask_or_differs(chat_family, tmp_path):
    """trl stops for templates it has no training version of (Llama 3.2, Mistral, SmolLM2); for
    Qwen2.5 its training template also learns the newline that ends the generation prompt
    '<|im_start|>assistant\\n' (we learn from after the prompt, as the model is prompted); Qwen3's own
    template drops earlier answers' think blocks, so trl's training template (which keeps them)
    renders other tokens: there each answer is found by its content, and learned with its end of
    turn as the whole conversation renders it."""
    for name in ('llama3.2', 'mistral', 'smollm2'):
        with pytest.raises(ValueError, match='not training-compatible'):
            trl_rows(chat_family(name)[0], TRAINED)
    hf_folder, prepared, _ = chat_family('qwen2.5')
    ours, reference = our_rows(prepared, TRAINED, tmp_path), trl_rows(hf_folder, TRAINED)
    tokenizer = load_tokenizer(prepared)
    for messages, (ids, trained), (trl_ids, trl_trained) in zip(TRAINED, ours, reference):
        assert ids == trl_ids and trained < trl_trained
        extra = sorted(trl_trained - trained)  # one per answer: the newline of '<|im_start|>assistant\n'
        assert len(extra) == sum(m['role'] == 'assistant' for m in messages)
        assert all(tokenizer.decode(ids[:t + 1], skip_special=False).endswith('<|im_start|>assistant\n')
                   for t in extra)
    prepared = chat_family('qwen3')[1]
    [(ids, trained)] = our_rows(prepared, [REASONED], tmp_path)
    learned = load_tokenizer(prepared).decode([ids[t] for t in sorted(trained)], skip_special=False)
    assert learned == ('odalys brenn keeps it<|im_end|>\n<think>\nships at sea look for the light\n</think>\n\n'
                       'they look for the light<|im_end|>\n')  # the first answer's reasoning is not rendered


def test_only_an_answer_that_cannot_be_found_stops_the_record(chat_family, tmp_path):
    """A template that renders earlier answers otherwise (upper-cased here) and so hides their content:
    one line naming the record, the message and the fix."""
    _, prepared, _ = chat_family('phi3')
    (tmp_path / 'upper.jinja').write_text(
        "{% for m in messages %}{{ '<|' + m.role + '|>' }}"
        "{{ m.content | upper if m.role == 'assistant' and not loop.last else m.content }}"
        "{{ '<|end|>' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")
    line = (r'chat.jsonl: record 1: message 3 \(assistant\): the chat template renders this answer differently '
            r'.*content is not found.* \{% generation %\} \(--chat-template FILE\)$')
    with pytest.raises(slowllama.SlowLlamaError, match=line):
        our_rows(prepared, [CONVERSATIONS[0]], tmp_path, tmp_path / 'upper.jinja')
    [(ids, trained)] = our_rows(prepared, [CONVERSATIONS[1]], tmp_path, tmp_path / 'upper.jinja')  # one answer: found
    assert load_tokenizer(prepared).decode([ids[t] for t in sorted(trained)]) == 'jumps over the lazy dog'


def test_a_token_across_a_generation_marks_edge_is_learned_as_transformers_mask_says(chat_family, tmp_path):
    """A mark that starts inside a word ('th' outside, 'e quick ...' inside: BPE writes 'the' as one
    token): that token is learned, as transformers' return_assistant_tokens_mask marks it."""
    from transformers import AutoTokenizer
    hf_folder, prepared, _ = chat_family('phi3')
    template = ("{% for m in messages %}{% if m.role == 'assistant' %}{{ '<|assistant|>th' }}{% generation %}"
                "{{ m.content }}<|end|>{% endgeneration %}{% else %}{{ '<|user|>' + m.content + '<|end|>' }}"
                "{% endif %}{% endfor %}")
    (tmp_path / 'edge.jinja').write_text(template)
    messages = [{'role': 'user', 'content': 'a keeper'}, {'role': 'assistant', 'content': 'e quick brown fox'}]
    [(ids, trained)] = our_rows(prepared, [messages], tmp_path, tmp_path / 'edge.jinja')
    reference = AutoTokenizer.from_pretrained(hf_folder).apply_chat_template(
        messages, chat_template=template, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert ids == reference['input_ids']
    assert trained == {t for t, m in enumerate(reference['assistant_masks']) if m and t > 0}
    tokenizer = load_tokenizer(prepared)
    assert tokenizer.decode([ids[min(trained)]]) == 'the'  # the edge token is there, and learned


@pytest.mark.parametrize('name', ['llama3.2', 'mistral', 'smollm2'])
def test_each_answer_and_its_end_of_turn_are_learned_where_trl_cannot_say(chat_family, tmp_path, name):
    """No reference here: the learned tokens are each answer's text and the template's end of turn,
    nothing of the prompts."""
    _, prepared, _ = chat_family(name)
    tokenizer = load_tokenizer(prepared)
    [(ids, trained)] = our_rows(prepared, [CONVERSATIONS[0]], tmp_path)
    text = tokenizer.decode([ids[t] for t in sorted(trained)], skip_special=False)
    end = {'llama3.2': '<|eot_id|>', 'mistral': '</s>', 'smollm2': '<|im_end|>\n'}[name]
    assert text.replace(' ', '') == f'odalysbrennkeepsit{end}theylookforthelight{end}'.replace(' ', '')


# --- no silent fallback -------------------------------------------------------------------------

@pytest.fixture(scope='module')
def untemplated_model(tmp_path_factory):
    """A prepared model whose tokenizer has no chat template."""
    folder = tmp_path_factory.mktemp('untemplated')
    make_hf_model(folder / 'hf', seed=3, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    save_tiny_tokenizer(folder / 'hf', chat_template=None)
    slowllama.prepare(folder / 'hf', folder / 'prepared', dtype='fp32')
    return folder / 'prepared'


def finetune(capsys, model, data, out, *flags):
    code = cli.main(['finetune', '--model', str(model), '--data', str(data), '--out', str(out), '--iters', '1',
                     '--seq-len', '32', '--device', 'cpu', *flags])
    captured = capsys.readouterr()
    return code, captured.err


CHAT = [[{'role': 'user', 'content': 'one two'}, {'role': 'assistant', 'content': 'three four'}]]
PAIRS = [{'prompt': [{'role': 'user', 'content': 'one two'}], 'chosen': [{'role': 'assistant', 'content': 'three'}],
          'rejected': [{'role': 'assistant', 'content': 'five six'}]}] * 2


def test_chat_data_on_a_model_without_a_template_stops_and_names_both_fixes(untemplated_model, tmp_path, capsys):
    data = write_chat(tmp_path / 'chat.jsonl', CHAT)
    pairs = tmp_path / 'pairs.jsonl'
    pairs.write_text(''.join(json.dumps(p) + '\n' for p in PAIRS))
    for flags, path in (((), data), (('--objective', 'dpo'), pairs)):
        code, err = finetune(capsys, untemplated_model, path, tmp_path / 'run', *flags)
        assert code == 2 and err.count('\n') == 1 and 'Traceback' not in err
        assert f'{path}: chat records, but {untemplated_model} has no chat template; add --chat-template FILE' in err
        assert '--chat-format plain' in err and not (tmp_path / 'run' / 'adapter').exists()


@pytest.mark.parametrize('objective', ['sft', 'dpo'])
def test_chat_format_plain_or_a_template_file_proceed_and_the_log_says_which(untemplated_model, tmp_path, capsys,
                                                                            objective):
    data = write_chat(tmp_path / 'chat.jsonl', CHAT)
    if objective == 'dpo':
        data.write_text(''.join(json.dumps(p) + '\n' for p in PAIRS))
    template = tmp_path / 'mine.jinja'
    template.write_text("{% for m in messages %}{{ '<|' + m.role + '|>' + m.content + '<|end|>' }}{% endfor %}"
                        "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    config = tmp_path / 'run.yaml'
    config.write_text('chat-format: plain\n')
    cases = {'plain': (('--chat-format', 'plain'), 'chat rendering: plain "role: content" lines (--chat-format '
                                                    'plain), not a chat template'),
             'yaml': (('--config', str(config)), 'chat rendering: plain "role: content" lines'),
             'file': (('--chat-template', str(template)), f'chat rendering: the chat template {template}; learned: '
                                                          'each assistant turn')}
    for case, (flags, line) in cases.items():
        out = tmp_path / case
        code, err = finetune(capsys, untemplated_model, data, out, '--objective', objective, *flags)
        assert code == 0, err
        log = (out / 'train.log').read_text().splitlines()
        assert line in log[1], log[:3]  # the data's summary, then the rendering, before any step
    code, err = finetune(capsys, untemplated_model, data, tmp_path / 'both', '--chat-format', 'plain',
                         '--chat-template', str(template))
    assert code == 2 and '--chat-template and --chat-format plain contradict' in err


def test_plain_lines_learn_each_answer_and_eos(untemplated_model, tmp_path):
    tokenizer = load_tokenizer(untemplated_model)
    data = load_data(write_chat(tmp_path / 'chat.jsonl', CHAT), tokenizer, 64, 1, chat_format='plain')
    example = data.train.examples[0]
    assert [t for t in example.targets if t != IGNORE] == tokenizer.encode('three four', bos=False, eos=True)
    assert data.rendering.startswith('chat rendering: plain')
    pairs = tmp_path / 'pairs.jsonl'
    pairs.write_text(''.join(json.dumps(p) + '\n' for p in PAIRS))
    pair = load_pairs(pairs, tokenizer, 64, chat_format='plain').train[0]
    assert pair.chosen[pair.chosen_start:] == tokenizer.encode('three', bos=False, eos=True)  # the answer and EOS
    pieces = ['user: ', 'one two', '\n', 'assistant: ']
    prompt = tokenizer.encode('') + [i for piece in pieces for i in tokenizer.encode(piece, bos=False)]
    assert pair.chosen[:pair.chosen_start] == prompt


def test_the_models_template_is_named_in_the_first_lines(chat_family, tmp_path, capsys):
    _, prepared, _ = chat_family('smollm2')
    data = write_chat(tmp_path / 'chat.jsonl', TRAINED)
    code, err = finetune(capsys, prepared, data, tmp_path / 'run')
    assert code == 0, err
    log = (tmp_path / 'run' / 'train.log').read_text().splitlines()
    assert log[0].startswith(f'{data}: chat, 2 training')
    assert log[1] == (f'chat rendering: the chat template {prepared}/chat_template.jinja; learned: each assistant '
                      'turn, from the generation prompt to its end as the template writes it')
