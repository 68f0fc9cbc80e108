"""Pictures and TensorBoard: a run keeps loss.png (train/eval loss, learning rate, DPO margins) up to
date, `plot` draws several runs, --tensorboard events hold metrics.jsonl's numbers, and a missing
optional package is one line, never a failed run."""
import json
import struct
import sys

import pytest

from slowllama import cli
from slowllama.training import plots
from slowllama.errors import SlowLlamaError

PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'


def png_size(path):
    """(width, height) of a PNG file, read from its IHDR chunk."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b'IHDR' and data.endswith(b'IEND\xaeB`\x82')
    return struct.unpack('>II', data[16:24])


def write_run(folder, n_steps, dpo=False, offset=0.0):
    folder.mkdir(parents=True)
    rows = []
    for step in range(1, n_steps + 1):
        row = {'step': step, 'loss': 3.0 - 0.1 * step + offset, 'lr': 1e-4 * step / n_steps, 'tokens_per_s': 10.0}
        if dpo:
            row['rewards/margins'] = 0.05 * step
        if step % 2 == 0:
            row['eval_loss'] = 3.1 - 0.1 * step
            if dpo:
                row['eval_rewards/margins'] = 0.04 * step
        rows.append(row)
    (folder / 'metrics.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows) + '{"step": 9, "lo')  # torn
    return rows


def lines_of(fig):
    """{panel title: {curve label: (steps, values)}} as handed to matplotlib."""
    return {ax.get_title(): {line.get_label(): (list(line.get_xdata()), list(line.get_ydata()))
                             for line in ax.get_lines()} for ax in fig.axes}


def test_the_figure_holds_each_runs_curves(tmp_path):
    sft = write_run(tmp_path / 'sft', 6)
    dpo = write_run(tmp_path / 'dpo', 4, dpo=True)
    fig = plots.figure({'sft': plots.read_metrics(tmp_path / 'sft'), 'dpo': plots.read_metrics(tmp_path / 'dpo')})
    drawn = lines_of(fig)
    assert list(drawn) == ['loss', 'learning rate', 'DPO reward margin']
    assert sorted(drawn['loss']) == ['dpo eval', 'dpo train', 'sft eval', 'sft train']
    assert drawn['loss']['sft train'] == ([r['step'] for r in sft], [r['loss'] for r in sft])
    assert drawn['loss']['dpo eval'] == ([2, 4], [dpo[1]['eval_loss'], dpo[3]['eval_loss']])
    assert drawn['learning rate']['sft lr'] == ([r['step'] for r in sft], [r['lr'] for r in sft])
    assert sorted(drawn['DPO reward margin']) == ['dpo eval', 'dpo train']  # the SFT run has none
    assert drawn['DPO reward margin']['dpo train'][1] == [r['rewards/margins'] for r in dpo]
    one = lines_of(plots.figure({'sft': plots.read_metrics(tmp_path / 'sft')}))
    assert list(one) == ['loss', 'learning rate'] and sorted(one['loss']) == ['eval', 'train']


def test_plot_command_writes_a_png(tmp_path, monkeypatch, capsys):
    write_run(tmp_path / 'a', 5)
    write_run(tmp_path / 'b', 5, offset=0.5)
    monkeypatch.chdir(tmp_path)
    assert cli.main(['plot', 'a', 'b']) == 0
    assert capsys.readouterr().out.strip() == 'runs.png'
    assert png_size(tmp_path / 'runs.png') == (1000, 400)  # two panels of 5 x 4 inches at 100 dpi
    assert cli.main(['plot', 'a']) == 0 and png_size(tmp_path / 'a' / 'loss.png')
    assert cli.main(['plot', 'a', '--out', 'a.jpg']) == 2
    assert 'name it FILE.png' in capsys.readouterr().err
    assert cli.main(['plot', 'a', 'nowhere']) == 2
    assert 'nowhere: no metrics.jsonl' in capsys.readouterr().err


def test_missing_matplotlib_is_one_hint_line(tmp_path, monkeypatch, capsys):
    write_run(tmp_path / 'a', 3)
    monkeypatch.setitem(sys.modules, 'matplotlib.figure', None)  # import -> ImportError
    assert cli.main(['plot', str(tmp_path / 'a')]) == 2
    assert capsys.readouterr().err == 'error: drawing plots needs matplotlib: pip install slowllama[plot]\n'
    logged = []
    report = plots.LossPlot(tmp_path / 'a', logged.append)
    report.refresh()
    report.close()  # a second redraw: no second line
    assert logged == ['loss.png not drawn: drawing plots needs matplotlib: pip install slowllama[plot]']
    assert not (tmp_path / 'a' / 'loss.png').exists()


def test_missing_tensorboard_is_one_clear_error(tmp_path, monkeypatch):
    from slowllama.training.tensorboard_log import TensorBoardLog
    monkeypatch.setitem(sys.modules, 'torch.utils.tensorboard', None)
    with pytest.raises(SlowLlamaError, match=r'^tensorboard needs the tensorboard package: pip install '
                                             r'slowllama\[tensorboard\]'):
        TensorBoardLog(tmp_path)


@pytest.mark.slow
def test_a_run_draws_loss_png_and_writes_tensorboard_events(tiny_text_model, tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    model_dir, _, _ = tiny_text_model
    story = tmp_path / 'story.txt'
    story.write_text('odalys brenn keeps the violet lamp burning every night. ships at sea look for the light. ' * 8)
    drawn = []
    plot_runs = plots.plot_runs
    monkeypatch.setattr(plots, 'plot_runs', lambda runs, out: drawn.append(
        [r['step'] for r in plots.read_metrics(runs[0])]) or plot_runs(runs, out))
    run_dir = tmp_path / 'run'
    assert cli.main(['finetune', '--model', str(model_dir), '--data', str(story), '--out', str(run_dir),
                     '--device', 'cpu', '--iters', '4', '--seq-len', '16', '--lr', '1e-2', '--val-fraction', '0.2',
                     '--eval-every', '2', '--tensorboard']) == 0
    assert drawn == [[1, 2], [1, 2, 3, 4]]  # redrawn at the evaluation of step 2 and at the end
    assert png_size(run_dir / 'loss.png')
    import matplotlib.image
    assert matplotlib.image.imread(str(run_dir / 'loss.png')).shape[2] == 4  # decodes as an RGBA picture
    rows = [json.loads(line) for line in (run_dir / 'metrics.jsonl').read_text().splitlines()]
    events = EventAccumulator(str(run_dir))
    events.Reload()
    assert {'train/loss', 'train/lr', 'train/grad_norm', 'eval/loss'} <= set(events.Tags()['scalars'])
    loss = [(e.step, e.value) for e in events.Scalars('train/loss')]
    assert loss == [(r['step'], pytest.approx(r['loss'], rel=1e-6)) for r in rows]
    assert [(e.step, pytest.approx(e.value, rel=1e-6)) for e in events.Scalars('eval/loss')] == \
        [(r['step'], r['eval_loss']) for r in rows if 'eval_loss' in r]


@pytest.mark.slow
def test_a_run_without_matplotlib_logs_one_hint_and_finishes(tiny_text_model, tmp_path, monkeypatch):
    model_dir, _, _ = tiny_text_model
    story = tmp_path / 'story.txt'
    story.write_text('ships at sea look for the light. ' * 20)
    monkeypatch.setitem(sys.modules, 'matplotlib.figure', None)
    run_dir = tmp_path / 'run'
    assert cli.main(['finetune', '--model', str(model_dir), '--data', str(story), '--out', str(run_dir),
                     '--device', 'cpu', '--iters', '4', '--seq-len', '16', '--eval-every', '1',
                     '--val-fraction', '0.2']) == 0
    log = (run_dir / 'train.log').read_text()
    assert log.count('loss.png not drawn: drawing plots needs matplotlib: pip install slowllama[plot]') == 1
    assert 'step 4/4' in log and not (run_dir / 'loss.png').exists()
