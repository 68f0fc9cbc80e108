"""The chat command: a conversation driven through stdin against transformers' greedy generation
on the same rendered conversation, the KV cache kept across turns, /reset, /exit and errors."""
import io

import pytest
import torch
from chat_families import FAMILIES
from reference import peft_model

import slowllama
from slowllama import cli
from slowllama.generation.conversation import Conversation
from slowllama.tokenizer.tokenizer import load_tokenizer

MAX_NEW = 8


def hf_reply(hf_model, hf_tokenizer, messages, pad_token_id=3):
    """transformers alone: the template rendered by its tokenizer, greedy generate, decoded."""
    ids = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                           return_dict=False)
    out = hf_model.generate(torch.tensor([ids]), max_new_tokens=MAX_NEW, do_sample=False, pad_token_id=pad_token_id)
    return hf_tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)


def chat(monkeypatch, capsys, lines, *flags):
    monkeypatch.setattr('sys.stdin', io.StringIO(''.join(line + '\n' for line in lines)))
    code = cli.main(['chat', *flags, '--max-new-tokens', str(MAX_NEW)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_chat_through_stdin_equals_transformers_greedy(tiny_text_model, monkeypatch, capsys):
    from transformers import AutoTokenizer
    model_dir, hf_folder, hf_model = tiny_text_model
    hf_tokenizer = AutoTokenizer.from_pretrained(hf_folder)
    turns = ['the quick brown fox', 'ships at sea', '/reset', 'one two three', '/exit', 'never read']
    code, out, err = chat(monkeypatch, capsys, turns, str(model_dir), '--device', 'cpu',
                          '--system', 'a lighthouse keeper')
    assert code == 0, err
    system = {'role': 'system', 'content': 'a lighthouse keeper'}
    first = hf_reply(hf_model, hf_tokenizer, [system, {'role': 'user', 'content': turns[0]}])
    second = hf_reply(hf_model, hf_tokenizer, [system, {'role': 'user', 'content': turns[0]},
                                                {'role': 'assistant', 'content': first},
                                                {'role': 'user', 'content': turns[1]}])
    third = hf_reply(hf_model, hf_tokenizer, [system, {'role': 'user', 'content': turns[3]}])
    assert out == f'{first}\n{second}\n{third}\n'
    assert 'conversation reset' in err
    assert len({first, second, third}) == 3  # three different answers: the check can fail


def test_chat_with_a_run_folders_adapter_equals_peft(tiny_text_model, tmp_path, monkeypatch, capsys):
    from transformers import AutoTokenizer
    model_dir, hf_folder, hf_model = tiny_text_model
    hf_tokenizer = AutoTokenizer.from_pretrained(hf_folder)
    reference = peft_model(hf_model, rank=4, targets=('q_proj', 'v_proj', 'down_proj'))
    reference.save_pretrained(tmp_path / 'run' / 'adapter')  # a run folder: --lora finds adapter/
    turns = ['ships at sea', 'the violet lamp']
    code, out, err = chat(monkeypatch, capsys, turns, str(model_dir), '--lora', str(tmp_path / 'run'))
    assert code == 0, err
    first = hf_reply(reference, hf_tokenizer, [{'role': 'user', 'content': turns[0]}])
    second = hf_reply(reference, hf_tokenizer, [{'role': 'user', 'content': turns[0]},
                                                {'role': 'assistant', 'content': first},
                                                {'role': 'user', 'content': turns[1]}])
    assert out == f'{first}\n{second}\n'
    assert first != hf_reply(hf_model, hf_tokenizer, [{'role': 'user', 'content': turns[0]}])  # it matters


def test_each_turn_feeds_only_its_new_tokens(tiny_text_model, monkeypatch):
    model_dir, _, _ = tiny_text_model
    model, tokenizer = slowllama.load(model_dir), load_tokenizer(model_dir)
    fed = []
    generate = model.generate

    def counting_generate(tokens, *args, **kwargs):
        fed.append(tokens.shape[1])
        return generate(tokens, *args, **kwargs)

    monkeypatch.setattr(model, 'generate', counting_generate)
    conversation = Conversation(model, tokenizer)
    conversation.reply('ships at sea', MAX_NEW)
    first_prompt = len(conversation.cache.tokens) - (MAX_NEW - 1)  # the last answer token is not fed yet
    assert fed == [first_prompt] and first_prompt > 1
    conversation.messages.append({'role': 'user', 'content': 'one two three'})
    second_prompt = conversation.prompt_ids()
    conversation.messages.pop()
    held = next(i for i, (a, b) in enumerate(zip(conversation.cache.tokens + [-1], second_prompt)) if a != b)
    conversation.reply('one two three', MAX_NEW)
    assert held >= first_prompt  # the history stays in the cache ...
    assert fed[1] == len(second_prompt) - held  # ... and only the new tokens go through the blocks
    assert conversation.cache.tokens[:len(second_prompt)] == second_prompt
    assert conversation.cache.length == len(conversation.cache.tokens)
    conversation.reset()
    assert conversation.cache.length == 0 and conversation.messages == []


def test_chat_errors_in_one_line(tiny_text_model, tmp_path, monkeypatch, capsys):
    model_dir, hf_folder, _ = tiny_text_model
    code, _, err = chat(monkeypatch, capsys, ['hi'], str(tmp_path))
    assert code == 2 and err.startswith('error: ') and err.count('\n') == 1
    code, _, err = chat(monkeypatch, capsys, ['hi'], str(model_dir), '--lora', str(tmp_path))
    assert code == 2 and 'neither an adapter folder' in err


def test_a_cache_cut_back_continues_as_a_fresh_pass(tiny_text_model):
    model_dir, _, _ = tiny_text_model
    model, tokenizer = slowllama.load(model_dir), load_tokenizer(model_dir)
    ids = tokenizer.encode('the quick brown fox jumps over the lazy dog')
    cache = model.new_cache()
    model.generate(torch.tensor([ids[:4]]), 3, cache=cache)  # 4 + 2 positions fed
    cache.keep(3)  # back to where the two sequences agree
    resumed = model.generate(torch.tensor([ids[3:]]), 20, cache=cache)
    fresh = model.generate(torch.tensor([ids]), 20)
    assert resumed[0].tolist() == fresh[0, 3:].tolist()
    assert cache.tokens == fresh[0, :-1].tolist()[:len(cache.tokens)]
    assert cache.length == len(cache.tokens) > 4 + 2 + 8  # it grew beyond its first reservation


def test_sampling_is_seeded_and_a_too_long_turn_is_refused(tiny_text_model, monkeypatch, capsys):
    model_dir, _, _ = tiny_text_model
    sampled = [chat(monkeypatch, capsys, ['ships at sea', 'one two'], str(model_dir), '--temperature', '1.5',
                    '--seed', '4')[1] for _ in range(2)]
    greedy = chat(monkeypatch, capsys, ['ships at sea', 'one two'], str(model_dir))[1]
    assert sampled[0] == sampled[1] != greedy and sampled[0].count('\n') == 2
    monkeypatch.setattr('sys.stdin', io.StringIO('ships at sea\n'))
    assert cli.main(['chat', str(model_dir), '--max-new-tokens', '300']) == 0  # the model has 256 positions
    assert "error: the conversation would pass the model's 256 positions; /reset to start over" in \
        capsys.readouterr().err


@pytest.mark.parametrize('name', list(FAMILIES))
def test_each_family_chats_two_turns_and_test_gen_chats_as_transformers(chat_family, name, monkeypatch, capsys):
    """A tiny model of each family, saved by transformers with its template in chat_template.jinja and
    prepared from that folder: two turns of chat, and test_gen --chat, equal transformers' greedy
    generation on the template transformers renders from the same folder."""
    from transformers import AutoTokenizer
    hf_folder, prepared, hf_model = chat_family(name)
    hf_tokenizer = AutoTokenizer.from_pretrained(hf_folder)
    turns = ['who keeps the lamp?', 'and the ships?']
    system = ['--system', 'you keep the lighthouse'] if FAMILIES[name].system else []
    code, out, err = chat(monkeypatch, capsys, turns, str(prepared), *system)
    assert code == 0 and 'error' not in err, err
    messages = [{'role': 'system', 'content': 'you keep the lighthouse'}] if system else []
    messages += [{'role': 'user', 'content': turns[0]}]
    first = hf_reply(hf_model, hf_tokenizer, messages, hf_tokenizer.pad_token_id)
    messages += [{'role': 'assistant', 'content': first}, {'role': 'user', 'content': turns[1]}]
    second = hf_reply(hf_model, hf_tokenizer, messages, hf_tokenizer.pad_token_id)
    assert out == f'{first}\n{second}\n'
    assert cli.main(['test_gen', str(prepared), '--chat', '--prompt', turns[0], '--max-new-tokens', str(MAX_NEW)]) == 0
    only_user = hf_reply(hf_model, hf_tokenizer, [{'role': 'user', 'content': turns[0]}], hf_tokenizer.pad_token_id)
    assert capsys.readouterr().out == only_user + '\n'


def test_a_model_without_a_template_chats_with_one_given(tmp_path, monkeypatch, capsys):
    from conftest import make_hf_model, save_tiny_tokenizer
    make_hf_model(tmp_path / 'hf', seed=3, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    save_tiny_tokenizer(tmp_path / 'hf', chat_template=None)
    slowllama.prepare(tmp_path / 'hf', tmp_path / 'model', dtype='fp32')
    capsys.readouterr()  # prepare's own lines
    code, _, err = chat(monkeypatch, capsys, ['ships at sea'], str(tmp_path / 'model'))
    assert code == 2 and err.count('\n') == 1
    assert err.startswith(f'error: {tmp_path / "model"} has no chat template; give one with --chat-template FILE')
    template = tmp_path / 'mine.jinja'
    template.write_text("{% for m in messages %}{{ '<|' + m.role + '|>' + m.content + '<|end|>' }}{% endfor %}"
                        "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    code, out, err = chat(monkeypatch, capsys, ['ships at sea', 'one two'], str(tmp_path / 'model'),
                          '--chat-template', str(template))
    assert code == 0 and out.count('\n') == 2, err


def test_gemma2_refuses_a_system_message_in_one_line_and_gemma3_folds_it_in(chat_family, monkeypatch, capsys):
    """Gemma has no system role: Gemma 2's template refuses one (the template's own words, one line),
    Gemma 3's puts it before the first user turn's text, inside that turn."""
    _, prepared, _ = chat_family('gemma2')
    capsys.readouterr()  # prepare's own lines
    _, _, err = chat(monkeypatch, capsys, ['who keeps the lamp?'], str(prepared), '--system', 'you keep it')
    errors = [line for line in err.splitlines() if line.startswith('error')]
    assert len(errors) == 1 and errors[0].endswith('fails: System role not supported'), err
    tokenizer = load_tokenizer(chat_family('gemma3')[1])
    rendered = tokenizer.decode(tokenizer.encode_chat([{'role': 'system', 'content': 'you keep it'},
                                                       {'role': 'user', 'content': 'who?'}], True))
    assert rendered == 'user\nyou keep it\n\nwho?\nmodel\n'  # the turn markers are special tokens
