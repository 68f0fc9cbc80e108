"""Issue 39: the step's plan keeps a block's activations only where keeping saves time, spends on
them the memory the page cache cannot use (on a cpu, and in host RAM beside cuda), and refuses a
memory limit too small for one block in flight. The plan functions are fed a run's figures."""
import pytest

import slowllama.engine.keep_cost as keep_cost
from slowllama.engine.keep_cost import fresh_bytes, keep_pays, measured_flops
from slowllama.engine.plan import (
    CPU_RUNTIME_BYTES,
    GIB,
    block_bytes,
    cap_budget,
    ffn_width,
    kept_activation_bytes,
    plan_step,
    predict,
    step_working_bytes,
)
from slowllama.engine.plan_limits import ram_page_cache
from slowllama.errors import SlowLlamaError
from slowllama.recipes.shapes import shape_config

EVERY = ('q', 'k', 'v', 'o', 'gate', 'up', 'down')
FITTED_CPU = {'fp32': 2.5e11, 'bf16': 6.2e11}  # the CPU the keep_cost rates were fitted on (its docstring)


@pytest.fixture
def fitted_cpu(monkeypatch):
    """The compute rates of the CPU the issue's figures came from, in place of this machine's."""
    monkeypatch.setattr(keep_cost, 'measured_flops', lambda dim, ffn, dtype: FITTED_CPU[dtype])


def cpu_plan(cfg, batch, seq, dtype, micro_batches, limit, targets=('q', 'v'), keep='auto'):
    """The plan a cpu run on the disk tier makes inside a memory limit of `limit` bytes, as the
    planner makes it: 90% of what the runtime leaves, less the two blocks held mapped."""
    held = 2 * block_bytes(cfg, dtype)
    budget = cap_budget(limit - CPU_RUNTIME_BYTES) - held
    return plan_step(cfg, batch, seq, dtype, micro_batches, budget, keep=keep, host_heap=True, in_flight=held,
                     working=step_working_bytes(cfg, batch, seq, dtype, micro_batches),
                     block_files=cfg.n_layers * block_bytes(cfg, dtype), targets=targets, rank=8)


def test_keeping_pays_at_short_sequences_and_not_at_long_ones_on_a_cpu(fitted_cpu):
    """0.4B bf16 at 1 x 8192 on every projection: the kept tensors are too large for the heap to
    reuse, and the fresh memory costs what the recompute's forward does; 4 x 128 and 2 x 128 keep;
    cuda's caching allocator makes keeping free at any length."""
    cfg = shape_config('0.4b')
    long = kept_activation_bytes(cfg, 1, 8192, 'bf16', EVERY)
    ffn = ffn_width(cfg)
    assert fresh_bytes(cfg, 1, 8192, 2, ffn, long, 'cpu') == long
    pays, why = keep_pays(cfg, 1, 8192, 'bf16', long, ffn, 'cpu')
    assert not pays and 'GFLOP' in why and 'GiB fresh' in why
    for batch, seq, dtype in ((4, 128, 'fp32'), (4, 128, 'bf16'), (2, 128, 'bf16'), (1, 4096, 'bf16')):
        assert keep_pays(cfg, batch, seq, dtype, kept_activation_bytes(cfg, batch, seq, dtype, EVERY), ffn, 'cpu')[0]
    assert keep_pays(cfg, 1, 8192, 'bf16', long, ffn, 'cuda') == (True, '')
    roomy = 64 * GIB
    plan = plan_step(cfg, 1, 8192, 'bf16', 1, roomy, working=step_working_bytes(cfg, 1, 8192, 'bf16'),
                     host_heap=True, targets=EVERY, rank=8)
    assert plan.kept_blocks == 0 and 'does not pay' in plan.describe()
    assert plan_step(cfg, 1, 8192, 'bf16', 1, roomy, keep='all', targets=EVERY).kept_blocks == cfg.n_layers
    short = plan_step(cfg, 4, 128, 'bf16', 1, roomy, host_heap=True, targets=EVERY, rank=8)
    assert short.kept_blocks == cfg.n_layers
    on_cuda = plan_step(cfg, 1, 8192, 'bf16', 1, roomy, targets=EVERY, rank=8, device_type='cuda')
    assert on_cuda.kept_blocks == cfg.n_layers


def test_where_the_products_are_slow_the_long_sequence_keeps(monkeypatch):
    """The compute rate is this machine's: at a tenth of the fitted CPU's (bf16 on an AVX2 CPU) the
    8k recompute costs more than the fresh memory, and auto keeps; the note gives the rate it used."""
    cfg = shape_config('0.4b')
    long = kept_activation_bytes(cfg, 1, 8192, 'bf16', EVERY)
    rates = {}
    monkeypatch.setattr(keep_cost, 'measured_flops', lambda dim, ffn, dtype: rates[dtype])
    rates['bf16'] = FITTED_CPU['bf16']
    pays, why = keep_pays(cfg, 1, 8192, 'bf16', long, ffn_width(cfg), 'cpu')
    assert not pays and f"{FITTED_CPU['bf16'] / 1e9:.0f} GFLOP/s measured here" in why
    rates['bf16'] = FITTED_CPU['bf16'] / 10
    pays, why = keep_pays(cfg, 1, 8192, 'bf16', long, ffn_width(cfg), 'cpu')
    assert pays and why.endswith('it pays at this shape') and '62 GFLOP/s measured here' in why
    plan = plan_step(cfg, 1, 8192, 'bf16', 1, 64 * GIB, working=step_working_bytes(cfg, 1, 8192, 'bf16'),
                     host_heap=True, targets=EVERY, rank=8)
    assert plan.kept_blocks == cfg.n_layers and 'it pays at this shape' in plan.describe()


def test_the_compute_rate_is_measured_once_and_only_where_the_decision_needs_it(monkeypatch):
    """measured_flops times a real product (a rate a CPU can have, faster in fp32 than in nothing),
    once a process per shape and dtype; a short sequence, whose kept tensors the heap reuses,
    decides without it."""
    measured_flops.cache_clear()
    rate = measured_flops(1024, 2816, 'fp32')
    assert 1e8 < rate < 1e14
    assert measured_flops(1024, 2816, 'fp32') == rate and measured_flops.cache_info().hits == 1
    monkeypatch.setattr(keep_cost, 'measured_flops', lambda *a: pytest.fail('measured where nothing is fresh'))
    cfg = shape_config('0.4b')
    assert keep_pays(cfg, 4, 128, 'bf16', kept_activation_bytes(cfg, 4, 128, 'bf16', EVERY), ffn_width(cfg),
                     'cpu') == (True, '')


@pytest.mark.parametrize('shape, limit_gib', [('7b', 4), ('0.4b', 0.5)])
def test_a_model_larger_than_the_limit_keeps_activations_one_that_fits_keeps_the_page_cache(shape, limit_gib):
    """The case the project exists for (issue 39's 7B in 4 GiB, 1 x 128 x --grad-accum 4): the block
    files cannot stay cached, so most of what the limit leaves beside the blocks in flight keeps
    activations, and the predicted peak stays within the limit. With a limit that holds the files
    beside the step the page cache keeps them. Both read off the figures, not set by the test."""
    cfg = shape_config(shape)
    files = cfg.n_layers * block_bytes(cfg, 'bf16')
    limit = int(limit_gib * GIB)
    assert files > limit  # the figures of this case
    tight = cpu_plan(cfg, 1, 128, 'bf16', 4, limit)
    assert 0 < tight.kept_blocks and tight.kept_bytes > 0.6 * tight.budget
    assert 'cannot stay in the page cache' in tight.describe() and 'read from disk each step' in tight.describe()
    peak = predict(cfg, 1, 128, 'bf16', 8, ('q', 'v'), device_is_host=True, micro_batches=4,
                   kept_blocks=tight.kept_blocks)
    assert peak.host_bytes <= limit
    roomy = cpu_plan(cfg, 1, 128, 'bf16', 4, 3 * files)
    assert 'left to the page cache' in roomy.describe()
    peak = predict(cfg, 1, 128, 'bf16', 8, ('q', 'v'), device_is_host=True, micro_batches=4,
                   kept_blocks=roomy.kept_blocks)
    assert peak.host_bytes + files <= 3 * files  # the steps' peak and the cached files, within the limit


def test_on_cuda_the_disk_tiers_files_keep_the_page_cache_only_where_they_fit_beside_the_spill():
    """cuda-like budgets: a 7B on the disk tier (12 GiB of files) with 64 GiB of host RAM left by
    the pinned tier keeps the page cache; with 8 GiB it cannot, and the spill may take it all."""
    cfg = shape_config('7b')
    files = cfg.n_layers * block_bytes(cfg, 'bf16')
    assert ram_page_cache(files, 64 * GIB, 0)[0] == 64 * GIB - files
    room, why = ram_page_cache(files, 8 * GIB, 1 * GIB)
    assert room == 8 * GIB and 'read from disk each step' in why
    plan = plan_step(cfg, 16, 512, 'bf16', 8, 8 * GIB, 64 * GIB, ram_files=files, device_type='cuda',
                     working=step_working_bytes(cfg, 16, 512, 'bf16', 8))
    assert plan.stash_ram_bytes == 64 * GIB - files and 'host RAM' in plan.describe()
    assert plan.trip * plan.n_layers * 16 * 512 * cfg.dim * 2 > plan.stash_device_bytes  # the spill reaches RAM
    tight = plan_step(cfg, 16, 512, 'bf16', 8, 8 * GIB, 8 * GIB, ram_files=files, device_type='cuda',
                      working=step_working_bytes(cfg, 16, 512, 'bf16', 8))
    assert tight.stash_ram_bytes == 8 * GIB and 'cannot stay in the page cache' in tight.describe()


def test_a_limit_below_one_block_in_flight_is_one_line_with_the_figures():
    cfg = shape_config('7b')
    held = 2 * block_bytes(cfg, 'bf16')
    with pytest.raises(SlowLlamaError, match=r'^max_device_mem: one block in flight needs \d+\.\d+ GiB \(') as error:
        plan_step(cfg, 4, 512, 'bf16', 1, 1024, working=step_working_bytes(cfg, 4, 512, 'bf16'), in_flight=held)
    assert '\n' not in str(error.value) and '`seq_len`' in str(error.value)


def test_the_command_line_refuses_a_limit_below_one_block_before_the_run(tiny_text_model, tmp_path, capsys):
    from slowllama.cli import main
    model_dir, _, _ = tiny_text_model
    (tmp_path / 'text.txt').write_text('the quick brown fox jumps over the lazy dog ' * 40)
    code = main(['finetune', '--model', str(model_dir), '--data', str(tmp_path / 'text.txt'), '--out',
                 str(tmp_path / 'run'), '--iters', '1', '--seq-len', '32', '--batch-size', '4', '--device', 'cpu',
                 '--max-device-mem', '1KB'])
    assert code == 2
    err = capsys.readouterr().err
    assert 'error: --max-device-mem: one block in flight needs' in err and 'Traceback' not in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / 'run' / 'checkpoints').exists()


def streamed_plan(cfg, micro_batches, limit, read_rate, batch=2, seq=128, dtype='fp32'):
    """cpu_plan on the disk tier once the run's reads told the disk's rate."""
    held = 2 * block_bytes(cfg, dtype)
    budget = cap_budget(limit - CPU_RUNTIME_BYTES) - held
    return plan_step(cfg, batch, seq, dtype, micro_batches, budget, host_heap=True, in_flight=held,
                     working=step_working_bytes(cfg, batch, seq, dtype, micro_batches),
                     block_files=cfg.n_layers * block_bytes(cfg, dtype), targets=('q', 'v'), rank=8,
                     disk_reads=(block_bytes(cfg, dtype), read_rate))


def test_read_from_disk_each_step_the_memory_goes_where_the_step_is_waiting(fitted_cpu):
    """The slow-disk bar's shape (0.4B fp32, 2 x 128, r=8 on q,v, 624 MiB): at 100 MB/s a block's
    read takes several times its compute, so a kept block saves nothing and its memory is worth more
    to the page cache at the step's turns: at most the two blocks held between the passes (read once,
    their backward waits on no read) keep theirs. At 5 GB/s with four micro-batches the compute is
    the limit: every block that fits keeps its activations. The plan line says which, in numbers."""
    cfg = shape_config('0.4b')
    fits = cpu_plan(cfg, 2, 128, 'fp32', 1, 624 * 2 ** 20).kept_blocks  # what fits, the rate unknown
    slow = streamed_plan(cfg, 1, 624 * 2 ** 20, 100e6)
    assert slow.kept_blocks <= 2 < fits and 'the reads are the limit' in slow.describe() and '100 MB/s' in slow.note
    fast = streamed_plan(cfg, 4, 624 * 2 ** 20, 5e9)
    most = cpu_plan(cfg, 2, 128, 'fp32', 4, 624 * 2 ** 20).kept_blocks
    assert fast.kept_blocks == most > 0 and 'the compute is the limit' in fast.describe()


def test_the_streamed_step_takes_the_longer_of_each_blocks_read_and_compute():
    step = keep_cost.streamed_step_seconds
    # reads the limit: 10 blocks at 1 s a read and 0.1 s a forward; the last two are held for the backward
    assert step(10, 0, 0.1, 1.0, 0.0, 0, 0) == pytest.approx(10 * 1.0 + 8 * 1.0 + 2 * 0.3)
    assert step(10, 0, 0.1, 1.0, 0.0, 3, 2) == pytest.approx(3 * 0.1 + 7 * 1.0 + 4 * 0.3 + 6 * 1.0)
    # compute the limit: each kept block saves its recompute, its fresh memory costs its forward more
    assert step(10, 4, 1.0, 0.1, 0.5, 0, 0) == pytest.approx(10 * 1.0 + 4 * 0.5 + 6 * 3.0 + 4 * 2.0)


def test_the_disk_rate_is_the_slow_quartile_of_the_reads():
    """Reads the page cache serves are fast: the rate stays the disk's while a quarter of the reads
    reach it, and is told only after a few reads."""
    import time

    from slowllama.weights.files import ReadTimes
    times = ReadTimes()
    slow = lambda: time.sleep(0.02) or bytes(10 ** 6)  # noqa: E731  (at most 50 MB/s)
    for _ in range(3):
        assert times.rate() is None or times.rate() <= 50e6
        times.timed(slow)
    times.timed(lambda: None, nbytes=10 ** 6)  # a read in place, served at once
    assert times.rate() <= 50e6
    for _ in range(9):
        times.timed(lambda: None, nbytes=10 ** 6)
    assert times.rate() > 1e9  # three slow of thirteen: under a quarter reached the disk


def test_a_run_reading_every_block_from_disk_plans_again_once_it_knows_the_disks_rate(tiny_text_model,
                                                                                         monkeypatch):
    """The plan made at load cannot know the disk's rate; the first step's reads tell it, and the next
    step runs on a plan weighed at that rate (in the memory measured at load: the steps' own memory is
    not taken off it again). Here the memory seen at load holds half the block files beside the step."""
    import torch

    import slowllama
    import slowllama.engine.planner as planner_module
    from slowllama.engine.trip import MicroBatch
    model_dir, _, _ = tiny_text_model
    store = slowllama.load(model_dir, offload='disk').store
    cfg, mapped = store.cfg, store.disk_tier_bytes()
    kept = 2 * cfg.n_layers * kept_activation_bytes(cfg, 1, 8, 'fp32', rank=4) * 1.5  # every block's, heap slack
    steps = step_working_bytes(cfg, 1, 8, 'fp32', 2) + 2 * 2 * 8 * cfg.dim * 4 + kept  # + the hidden states
    assert kept < mapped['total'] // 2  # the files cannot stay cached beside the step, the activations fit
    monkeypatch.setattr(planner_module, 'free_host_memory',
                        lambda: int((CPU_RUNTIME_BYTES + 2 * mapped['block'] + mapped['total'] // 2 + steps) / 0.9))
    model = slowllama.load(model_dir, offload='disk', batch_hint=(1, 8), grad_accum=2,
                           lora=slowllama.LoraConfig(rank=4, targets=('q', 'v')))
    at_load = model.step_plan
    assert 'cannot stay in the page cache' in at_load.note and 'MB/s' not in at_load.note
    tokens = torch.randint(0, cfg.vocab_size, (1, 8))
    micro = [MicroBatch(tokens, tokens.roll(-1, 1))] * 2
    model.accumulate(micro)
    assert model.store.read_rate() is not None
    model.accumulate(micro)
    weighed = model.step_plan
    assert weighed is not at_load and 'read from disk each step at' in weighed.note, weighed.note
    assert weighed.budget == at_load.budget
