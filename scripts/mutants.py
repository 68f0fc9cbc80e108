"""Deliberate mistakes, one at a time, in a copy of the package: does some test catch each?

    python scripts/mutants.py                    # every mutant in MUTANTS
    python scripts/mutants.py residual-scale ... # some, by name
    python scripts/mutants.py --list             # the table
    python scripts/mutants.py --check            # only: each fragment is found exactly once

Each row of MUTANTS is the simplest wrong implementation a tired engineer might write: a file, a
fragment of its code (found exactly once), its wrong replacement, and the tests that must then fail.
The repository (slowllama/, tests/, scripts/, setup.cfg) is copied to a temporary folder once; for
each mutant the one file is changed there, the named tests run with the copy first on PYTHONPATH
(`pytest -x`: the first failure is enough), and the file is put back. A mutant is `caught` when a
test fails, `SURVIVED` when all pass; a run that cannot collect its tests is an `error`. First the
named tests run on the unchanged copy (--no-baseline skips it): a test that fails there catches
nothing. Exits 1 when a mutant survived or errored.

Adding a mutant is one line in MUTANTS. tests/test_mutants.py checks that every fragment is still
found exactly once and every named test still exists, so a refactor makes the table fail loudly
instead of going stale.
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import NamedTuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COPIED = ('slowllama', 'tests', 'scripts', 'setup.cfg', 'pyproject.toml')


class Mutant(NamedTuple):
    name: str
    file: str         # relative to the repository root
    fragment: str     # found exactly once in the file
    replacement: str  # the wrong code
    tests: str        # pytest node ids, space-separated: at least one must fail


M = Mutant
T_MODEL = 'tests/test_model.py'
T_ENGINE = 'tests/test_engine.py'
T_TRIP = 'tests/test_trip.py'
T_KEPT = 'tests/test_kept.py'
T_QUANT = 'tests/test_quant.py'
T_GGUF = 'tests/test_gguf_export.py'
T_QUANT_ORDER = f'{T_QUANT}::test_nf4_scales_blocks_in_bitsandbytes_order_of_operations'
T_MOE = 'tests/test_moe.py'
T_MOE_BF16 = f'{T_MOE}::test_router_and_experts_in_bf16_are_transformers_bit_for_bit'
T_MOE_PEFT = f'{T_MOE}::test_logits_loss_and_grads_equal_transformers_peft'


def family_test(name):
    """test_families.py's comparison with transformers and peft (logits, loss, LoRA gradients) for one family."""
    return f'tests/test_families.py::test_logits_loss_and_grads_equal_transformers_peft_with_dropout[{name}]'


MUTANTS = [
    # --- model dropout (model/block.py) ---------------------------------------------------------
    M('residual-scale', 'slowllama/model/block.py', 'F.dropout(x, self.dropout, self.training)',
      'F.dropout(x, self.dropout, self.training) * (1 - self.dropout)',
      f'{T_MODEL}::test_block_dropout_is_transformers_attention_dropout_plus_residual_dropout '
      f'{T_MODEL}::test_residual_dropout_zeroes_a_fraction_p_and_scales_the_rest'),
    M('no-attention-dropout', 'slowllama/model/block.py', 'dropout = self.dropout if self.training else 0.0',
      'dropout = 0.0', f'{T_MODEL}::test_attention_dropout_alone_equals_transformers_and_keeps_the_expectation'),
    M('attention-dropout-in-eval', 'slowllama/model/block.py', 'dropout = self.dropout if self.training else 0.0',
      'dropout = self.dropout',
      f'{T_MODEL}::test_block_dropout_is_transformers_attention_dropout_plus_residual_dropout'),
    M('residual-dropout-after-add', 'slowllama/model/block.py',
      'return h + self._branch(self._mlp(self.post_attention_layernorm(h), fetch_experts, routing))',
      'return self._branch(h + self._mlp(self.post_attention_layernorm(h), fetch_experts, routing))',
      f'{T_MODEL}::test_block_dropout_is_transformers_attention_dropout_plus_residual_dropout'),
    # --- the block's math -------------------------------------------------------------------------
    M('rope-rotate-sign', 'slowllama/model/block.py', 'torch.cat([-second, first], dim=-1)',
      'torch.cat([second, -first], dim=-1)', f'{T_MODEL}::test_logits_equal_transformers'),
    M('rms-norm-eps-outside', 'slowllama/model/block.py', 'torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)',
      '(torch.rsqrt(x32.pow(2).mean(-1, keepdim=True)) + eps)', f'{T_MODEL}::test_logits_equal_transformers'),
    M('llama3-rope-smoothing-swapped', 'slowllama/model/block.py',
      'smoothed = (1 - smooth) * inv_freq / factor + smooth * inv_freq',
      'smoothed = smooth * inv_freq / factor + (1 - smooth) * inv_freq', f'{T_MODEL}::test_logits_equal_transformers'),
    M('document-mask-not-causal', 'slowllama/model/block.py', 'return (same & causal)[:, None]', 'return same[:, None]',
      f'{T_ENGINE}::test_packed_documents_equal_each_document_alone_in_transformers_peft'),
    M('sliding-window-off-by-one', 'slowllama/model/block.py', 'visible & (keys > queries - window)',
      'visible & (keys >= queries - window)', 'tests/test_families.py'),
    M('kv-cache-window-keeps-one-less', 'slowllama/model/block.py',
      'drop = max(0, self.k.shape[2] - (self.window - 1))', 'drop = max(0, self.k.shape[2] - (self.window - 2))',
      'tests/test_families.py'),
    M('gelu-for-silu', 'slowllama/model/block.py', "if self.gelu else F.silu(gate)",
      "if self.gelu else F.gelu(gate)", f'{T_MODEL}::test_logits_equal_transformers'),
    # --- LoRA (model/lora.py) and its merge ----------------------------------------------------------
    M('lora-scale-alpha', 'slowllama/model/lora.py', 'return self.alpha / self.rank', 'return self.alpha',
      f'{T_ENGINE}::test_logits_loss_and_grads_equal_transformers_peft'),
    M('lora-dropout-unscaled', 'slowllama/model/lora.py', 'lora_in = F.dropout(lora_in, self.dropout, True)',
      'lora_in = F.dropout(lora_in, self.dropout, True) * (1 - self.dropout)',
      'tests/test_packed.py::test_nf4_equals_transformers_peft_bitsandbytes_with_dropout'),
    M('lora-dropout-in-eval', 'slowllama/model/lora.py', 'if self.dropout and self.training:', 'if self.dropout:',
      'tests/test_packed.py::test_nf4_equals_transformers_peft_bitsandbytes_with_dropout'),
    M('lora-b-not-zero', 'slowllama/model/lora.py',
      "self.out_features, bias=False, device=device, dtype=dtype)\n        nn.init.kaiming_uniform_(self.lora_A.weight, "
      "a=math.sqrt(5))\n        nn.init.zeros_(self.lora_B.weight)",
      "self.out_features, bias=False, device=device, dtype=dtype)\n        nn.init.kaiming_uniform_(self.lora_A.weight, "
      "a=math.sqrt(5))\n        nn.init.normal_(self.lora_B.weight, std=0.02)",  # a fresh LoRA must be the base model
      'tests/test_dpo.py::test_dpo_run_resumes_exactly_and_keeps_its_reference'),
    M('merge-without-scale', 'slowllama/weights/formats/export.py',
      '(weight.float() + self.lora.scale * (B.float() @ A.float()))', '(weight.float() + (B.float() @ A.float()))',
      'tests/test_export.py'),
    # --- the streamed head (engine/head.py) ---------------------------------------------------------
    M('head-sum-not-rescaled', 'slowllama/engine/head.py', 'exp_rows.mul_(rescale[:, None]).add_(',
      'exp_rows.add_(', f'{T_ENGINE}::test_streamed_backward_equals_whole_model_autograd_with_dropout'),
    M('head-lse-not-rescaled', 'slowllama/engine/head.py',
      'running_sum = self.running_sum * rescale + exp_logits.sum(dim=-1)',
      'running_sum = self.running_sum + exp_logits.sum(dim=-1)',
      f'{T_ENGINE}::test_streamed_backward_equals_whole_model_autograd_with_dropout'),
    M('head-mean-over-all-positions', 'slowllama/engine/head.py', 'weight = valid.float() / valid.sum().clamp(min=1)',
      'weight = valid.float() / valid.numel()', f'{T_ENGINE}::test_logits_loss_and_grads_equal_transformers_peft'),
    M('head-logps-unmasked', 'slowllama/engine/head.py',
      "return torch.where(targets != IGNORE, target_logit - lse, 0.0).view(x.shape[:-1])",
      "return (target_logit - lse).view(x.shape[:-1])",
      'tests/test_dpo.py::test_tokens_loss_and_metrics_equal_trl_dpo_trainer'),
    # --- the step's schedule (engine/trip.py) and its phases (recompute.py, kept.py, gradients.py) ---
    M('recompute-without-rng-replay', 'slowllama/engine/recompute.py', '    set_rng_state(block_input.device, rng_state)\n',
      '', f'{T_ENGINE}::test_streamed_backward_equals_whole_model_autograd_with_dropout'),
    M('micro-batch-share-ignored', 'slowllama/engine/gradients.py', 'p.grad.add_(g, alpha=share)', 'p.grad.add_(g)',
      f'{T_TRIP}::test_trips_equal_the_sequential_accumulation_bit_for_bit'),
    M('one-rng-stream-for-every-micro-batch', 'slowllama/engine/trip.py',
      '[get_rng_state(device)] + [seeded_rng_state(device, seed) for seed in seeds]',
      '[get_rng_state(device)] * count', f'{T_TRIP}::test_the_streams_differ_and_do_not_depend_on_the_trip'),
    M('recompute-replays-micro-batch-0s-stream', 'slowllama/engine/trip.py', 'rng_before[i, k] = streams[k]',
      'rng_before[i, k] = streams[0]', f'{T_KEPT}::test_kept_activations_give_the_recompute_bits'),
    M('the-last-blocks-released-before-the-backward', 'slowllama/engine/trip.py', 'if i < last - 1:', 'if i < last:',
      f'{T_TRIP}::test_each_block_crosses_twice_a_trip'),
    M('the-first-blocks-kept', 'slowllama/engine/trip.py', 'if i > last - kept_blocks else None',
      'if i < kept_blocks else None', f'{T_KEPT}::test_some_blocks_kept_the_others_recomputed'),
    M('kept-graph-holds-the-weights', 'slowllama/engine/kept.py', '        if name is None or tensor',
      '        if True or tensor', f'{T_KEPT}::test_the_graph_keeps_no_weight_they_come_back_from_the_fetch'),
    M('kept-activations-planned-without-lora-inputs', 'slowllama/engine/plan.py',
      '            total += t * width[source] * f  # each target', '            pass  # each target',
      f'{T_KEPT}::test_the_planners_activation_bytes_are_what_torch_saves'),
    # --- quantization (model/quant.py) --------------------------------------------------------------
    M('nf4-nibble-order', 'slowllama/model/quant.py', 'return (codes[0::2] << 4) | codes[1::2], absmax',
      'return (codes[1::2] << 4) | codes[0::2], absmax', f'{T_QUANT}::test_nf4_bit_identical_to_bitsandbytes'),
    M('nf4-full-block-divided', 'slowllama/model/quant.py', '(blocks * (1.0 / absmax.clamp(min=1e-38))[:, None])',
      '(blocks / absmax.clamp(min=1e-38)[:, None])',
      f'{T_QUANT}::test_nf4_bit_identical_to_bitsandbytes {T_QUANT_ORDER}'),
    M('nf4-tail-divided-differently', 'slowllama/model/quant.py', '(flat[full:] / tail_max).clamp(-1, 1)',
      '(flat[full:] * (1.0 / tail_max)).clamp(-1, 1)',
      f'{T_QUANT}::test_nf4_bit_identical_to_bitsandbytes {T_QUANT_ORDER}'),
    M('nf4-plain-pairs-swapped', 'slowllama/model/quant.py', 'torch.stack([code[byte >> 4], code[byte & 15]], dim=1)',
      'torch.stack([code[byte & 15], code[byte >> 4]], dim=1)', f'{T_QUANT}::test_nf4_bit_identical_to_bitsandbytes'),
    M('double-quant-no-offset', 'slowllama/model/quant.py', '    return out + offset\n', '    return out\n',
      f'{T_QUANT}::test_double_quant_dequantizes_as_bitsandbytes_does'),
    M('double-quant-block-of-64', 'slowllama/model/quant.py', 'ABSMAX_BLOCK = 256', 'ABSMAX_BLOCK = 64',
      f'{T_QUANT}::test_double_quant_dequantizes_as_bitsandbytes_does'),
    M('q8-round-half-even', 'slowllama/model/quant.py', 'codes = _round_half_away(blocks * inverse).to(torch.int8)',
      'codes = torch.round(blocks * inverse).to(torch.int8)', f'{T_QUANT}::test_q8_0_bit_identical_to_gguf'),
    M('q8-scale-128', 'slowllama/model/quant.py', 'scale = blocks.abs().amax(dim=2, keepdim=True) / 127',
      'scale = blocks.abs().amax(dim=2, keepdim=True) / 128', f'{T_QUANT}::test_q8_0_bit_identical_to_gguf'),
    # --- GGUF export (weights/formats/gguf_export.py) -----------------------------------------------
    M('gguf-bf16-truncated', 'slowllama/weights/formats/gguf_export.py',
      'return tensor.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)',
      'return (tensor.view(torch.int32) >> 16).to(torch.int16).numpy().view(np.uint16)',
      f'{T_GGUF}::test_reduced_types_are_the_merged_weights_rounded'),
    M('gguf-f16-through-bf16', 'slowllama/weights/formats/gguf_export.py', 'return tensor.to(torch.float16).numpy()',
      'return tensor.to(torch.bfloat16).to(torch.float16).numpy()',
      f'{T_GGUF}::test_reduced_types_are_the_merged_weights_rounded'),
    M('gguf-q8-from-f16', 'slowllama/weights/formats/gguf_export.py',
      'return quantize_rows(tensor.numpy(), kind)',
      'return quantize_rows(tensor.half().float().numpy(), kind)',
      f'{T_GGUF}::test_reduced_types_are_the_merged_weights_rounded'),
    # --- the optimizer's step and the schedule (training/trainer.py) --------------------------------
    M('warmup-starts-at-zero', 'slowllama/training/settings.py', 'return cfg.lr * step / cfg.warmup',
      'return cfg.lr * (step - 1) / cfg.warmup', 'tests/test_train.py::test_schedule_warmup_then_cosine_or_constant'),
    M('cosine-one-step-late', 'slowllama/training/settings.py', 'progress = (step - 1 - cfg.warmup)',
      'progress = (step - cfg.warmup)', 'tests/test_train.py::test_schedule_warmup_then_cosine_or_constant'),
    M('no-gradient-clipping', 'slowllama/training/trainer.py',
      "max_norm = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float('inf')", "max_norm = float('inf')",
      'tests/test_train.py::test_the_step_is_adamw_on_the_clipped_gradient'),
    M('no-weight-decay', 'slowllama/training/settings.py', "'weight_decay': cfg.weight_decay})",
      "'weight_decay': 0.0})", 'tests/test_train.py::test_the_step_is_adamw_on_the_clipped_gradient'),
    M('resume-keeps-the-saved-iters', 'slowllama/training/trainer.py',
      "self.step, self.data_position = state['step'], state['data_position']",
      "self.step, self.data_position, self.cfg.iters = state['step'], state['data_position'], state['iters']",
      'tests/test_dpo.py::test_dpo_run_resumes_exactly_and_keeps_its_reference'),
    # --- the data masks (data/) ---------------------------------------------------------------------
    M('mask-off-by-one', 'slowllama/data/examples.py', 'zip(ids[1:], learn[1:])', 'zip(ids[1:], learn[:-1])',
      'tests/test_data.py'),
    M('padding-is-a-target', 'slowllama/data/dataset.py',
      'targets = torch.full((len(examples), width), IGNORE, dtype=torch.long)',
      'targets = torch.full((len(examples), width), pad_id, dtype=torch.long)', 'tests/test_data.py'),
    M('packed-positions-run-on', 'slowllama/data/dataset.py',
      'positions = positions + list(range(len(example.tokens)))',
      'positions = positions + list(range(len(positions), len(positions) + len(example.tokens)))',
      'tests/test_data.py'),
    M('dpo-answer-starts-one-late', 'slowllama/data/preference.py', 'i if t + 1 >= start else IGNORE',
      'i if t >= start else IGNORE', 'tests/test_dpo.py::test_tokens_loss_and_metrics_equal_trl_dpo_trainer'),
    M('dpo-chosen-rejected-swapped', 'slowllama/training/dpo.py',
      'loss = -F.logsigmoid(beta * (logratios[:, 0] - logratios[:, 1])).mean()',
      'loss = -F.logsigmoid(beta * (logratios[:, 1] - logratios[:, 0])).mean()',
      'tests/test_dpo.py::test_tokens_loss_and_metrics_equal_trl_dpo_trainer'),
    # --- the benchmark (recipes/bench.py) ----------------------------------------------------------
    M('bench-in-the-driver', 'slowllama/recipes/bench.py', 'runs[(system, mode, q)].append(run_in_subprocess(spec))',
      'runs[(system, mode, q)].append(run_worker(spec))',
      'tests/test_bench.py::test_each_configuration_runs_in_its_own_process_beside_its_prediction'),
    M('bench-peer-other-target', 'slowllama/recipes/bench.py', "'v': 'v_proj'", "'v': 'o_proj'",
      'tests/test_bench.py::test_the_peer_trains_what_we_train'),
    M('bench-plan-of-another-mode', 'slowllama/recipes/bench.py', "'ram': (0, cfg.n_layers)", "'ram': (0, 0)",
      'tests/test_bench.py::test_each_configuration_runs_in_its_own_process_beside_its_prediction'),
    # --- atomic writes (weights/files.py) -----------------------------------------------------------
    M('staging-in-the-system-temp', 'slowllama/weights/files.py',
      'tempfile.mkdtemp(dir=parent, prefix=prefix)', 'tempfile.mkdtemp(prefix=prefix)',
      'tests/test_kill.py::test_a_killed_writer_leaves_the_old_or_the_new_state'),
    M('leftovers-never-removed', 'slowllama/weights/files.py', '    announce(clean_leftovers(final))\n', '',
      'tests/test_files.py::test_a_killed_write_leaves_the_old_target_and_the_next_write_removes_its_leftover'),
    M('live-writers-staging-removed', 'slowllama/weights/files.py',
      '        return True\n    return False\n', '        return True\n    return True\n',
      'tests/test_files.py::test_a_live_writers_staging_is_left_alone'),
    M('nested-adapter-staged-again', 'slowllama/weights/files.py', "match['pid'] == str(os.getpid())",
      "match['pid'] == 'never'",
      'tests/test_files.py::test_a_checkpoint_writes_its_adapter_in_place_and_a_failure_leaves_nothing'),
    # --- Mixture-of-Experts: the router (model/moe.py) and the experts' fetch (weights/store.py) ----------
    M('moe-router-softmax-in-compute-dtype', 'slowllama/model/moe.py',
      'probs = F.softmax(logits, dim=-1, dtype=torch.float32)', 'probs = F.softmax(logits, dim=-1)',
      f'{T_MOE_BF16}[qwen3_moe-top2-norm]'),
    M('moe-top-k-not-renormalised', 'slowllama/model/moe.py',
      'weights = weights / weights.sum(dim=-1, keepdim=True)', 'weights = weights',
      f'{T_MOE_PEFT}[qwen3_moe-top2-norm]'),
    M('mixtral-experts-weighed-in-bf16', 'slowllama/model/moe.py', "self.fp32_weights = cfg.model_type == 'mixtral'",
      'self.fp32_weights = False', f'{T_MOE_BF16}[mixtral-top2]'),
    M('moe-fetches-the-first-choices-only', 'slowllama/model/moe.py', 'hit = torch.unique(ids).tolist()',
      'hit = torch.unique(ids[:, 0]).tolist()',  # a prefill's tokens pick every expert first; one token does not
      f'{T_MOE}::test_generate_greedy_equals_transformers[mixtral-top2] '
      f'{T_MOE}::test_streamed_fetches_only_the_routed_experts[mixtral-top2]'),
    M('experts-held-past-the-release', 'slowllama/weights/store.py', '        self._held_experts.pop(i, None)\n', '',
      f'{T_MOE}::test_streamed_fetches_only_the_routed_experts[qwen3_moe-top2-norm]'),
    M('kept-backward-fetches-every-expert', 'slowllama/engine/experts.py',
      "ids = sorted({int(n.split('.')[2]) for n in names.forward if n.startswith(EXPERTS + '.')})",
      'ids = list(range(store.cfg.n_experts))',
      f'{T_MOE}::test_streamed_fetches_only_the_routed_experts[qwen3_moe-top2-norm]'),
    M('expert-lora-b-columns-blocked', 'slowllama/model/lora.py', 'return a[e * rank:(e + 1) * rank], b[:, e::n_experts]',
      'return a[e * rank:(e + 1) * rank], b[:, e * rank:(e + 1) * rank]',  # PEFT interleaves B's columns
      f'{T_MOE_PEFT}[qwen3_moe-top2-norm]'),
    # --- the dense families' quirks (model/block.py, model/config.py, engine/head.py) ------------------
    M('gemma-norm-scaled-by-w', 'slowllama/model/block.py', 'return (x32 * (1.0 + weight.float())).to(x.dtype)',
      'return (x32 * weight.float()).to(x.dtype)', family_test('gemma2')),
    M('gemma2-attention-softcap-skipped', 'slowllama/model/block.py', '    scores = torch.tanh(scores / cap) * cap\n',
      '', family_test('gemma2')),
    M('final-softcap-skipped-in-the-streamed-head', 'slowllama/engine/head.py',
      'logits, slope = shape_logits(self.cfg, F.linear(self.hidden, rows).float())',
      'logits, slope = F.linear(self.hidden, rows).float(), None', family_test('gemma2')),
    M('softcap-slope-not-on-the-target-row', 'slowllama/engine/head.py',
      'target_rows = target_rows * target_slope', 'target_rows = target_rows', family_test('gemma2')),
    M('granite-residual-multiplier-dropped', 'slowllama/model/block.py', 'x = x * self.residual_multiplier', 'x = x',
      family_test('granite')),
    M('smollm3-no-rope-layers-rotated', 'slowllama/model/config.py',
      'and not cfg.no_rope_layers[i]:\n        return None', 'and not cfg.no_rope_layers[i]:\n        return 0',
      family_test('smollm3')),
    M('olmo2-qk-norm-per-head', 'slowllama/model/block.py',
      '            q, k = self.q_norm(q), self.k_norm(k)\n        q = q.view(batch, seq, self.n_heads, self.head_dim)',
      '            q = rms_norm(q.view(batch, seq, self.n_heads, -1), self.q_norm.weight.view(self.n_heads, -1), '
      'self.q_norm.eps, self.q_norm.kind).view(batch, seq, -1)\n'
      '            k = rms_norm(k.view(batch, seq, self.n_kv_heads, -1), self.k_norm.weight.view(self.n_kv_heads, -1), '
      'self.k_norm.eps, self.k_norm.kind).view(batch, seq, -1)\n'
      '        q = q.view(batch, seq, self.n_heads, self.head_dim)', family_test('olmo2')),
    M('gemma3-sliding-layers-global-rope-base', 'slowllama/model/block.py',
      'theta = cfg.rope_local_theta if local else cfg.rope_theta', 'theta = cfg.rope_theta',
      family_test('gemma3_text')),
    M('attention-multiplier-dropped', 'slowllama/model/block.py', 'scale=self.scale, enable_gqa',
      'scale=None, enable_gqa', family_test('granite')),
    M('logits-scaling-left-out-of-the-slope', 'slowllama/model/block.py',
      'slope = (1.0 / cfg.logits_scaling) if slope is None else', 'slope = None if slope is None else',
      family_test('granite')),
    M('gemma-full-layers-windowed', 'slowllama/model/config.py',
      "cfg.layer_types[i] == 'full_attention':  # gemma2, gemma3\n        return None",
      "cfg.layer_types[i] == 'full_attention':  # gemma2, gemma3\n        return cfg.sliding_window",
      family_test('gemma2')),
    # --- GGUF K-quant encoders (weights/formats/gguf_quants.py), against llama.cpp's bytes ----------------
    M('k-quant-6-bit-scales-truncated', 'slowllama/weights/formats/gguf_quants.py',
      'ls = np.minimum(np.rint(inv_scale[:, None] * scales).astype(np.int64) & 0xFF, 63)',
      'ls = np.minimum((inv_scale[:, None] * scales).astype(np.int64) & 0xFF, 63)',
      'tests/test_gguf_quants.py::test_bytes_equal_llama_cpps_block_for_block'),
    M('q6-k-levels-round-half-up', 'slowllama/weights/formats/gguf_quants.py',
      'again = np.clip(np.rint(xc / dcol), -32, 31) + 32', 'again = np.clip(np.floor(xc / dcol + f32(0.5)), -32, 31) + 32',
      'tests/test_gguf_quants.py::test_halfway_values_round_to_even_as_ggml_does'),
    M('q3-k-levels-round-half-up', 'slowllama/weights/formats/gguf_quants.py',
      'again = np.clip(np.rint(xc / dcol), -4, 3) + 4', 'again = np.clip(np.floor(xc / dcol + f32(0.5)), -4, 3) + 4',
      'tests/test_gguf_quants.py::test_halfway_values_round_to_even_as_ggml_does'),
    # --- a block's shapes, read off the block (model/block.py) --------------------------------------
    M('block-shapes-without-biases', 'slowllama/model/block.py',
      'names = sorted(state, key=lambda name: order.get(name, len(order)))',
      "names = sorted((n for n in state if not n.endswith('.bias')), key=lambda name: order.get(name, len(order)))",
      'tests/test_shapes.py::test_the_block_shapes_are_the_transformers_blocks'),
    # --- the MoE step's last pieces: the aux loss's per-block gradient, the packed expert's Function,
    # a MoE block's kept bytes; and the keep decision's measured compute rate --------------------------
    M('aux-loss-gradient-not-pushed-into-the-router', 'slowllama/engine/balance.py',
      'else self.coef * self.loads[k].grad()', 'else 0 * self.loads[k].grad()',  # the loss right, its grad lost
      'tests/test_moe_aux.py::test_aux_loss_and_grads_equal_transformers_peft[qwen3_moe-top2-norm-none-1]'),
    M('unpacked-expert-input-gradient-off-by-one', 'slowllama/model/moe.py',
      'leaf = x.detach().requires_grad_(ctx.needs_input_grad[3])',
      'leaf = x.detach().requires_grad_(ctx.needs_input_grad[2])',  # index 2 is the LoRA list: no input grad
      'tests/test_moe_unpack.py::test_one_expert_is_unpacked_at_a_time_and_grads_are_unpack_alls[nf4-none]'),
    M('moe-kept-bytes-without-the-gathered-experts', 'slowllama/engine/plan.py',
      'total = t * (per_choice * k * cfg.dim * w + cfg.n_experts * f + 128)', 'total = t * (cfg.n_experts * f + 128)',
      'tests/test_kept.py::test_a_moe_blocks_kept_bytes_are_counted_never_under'),
    M('keep-cost-with-a-constant-compute-rate', 'slowllama/engine/keep_cost.py',
      ', measured_flops(cfg.dim, ffn, dtype)\n', ', 6.2e11\n',
      'tests/test_keep_pays.py::test_where_the_products_are_slow_the_long_sequence_keeps'),
    M('disk-rate-from-the-fastest-reads', 'slowllama/weights/files.py',
      'sorted(self._rates)[len(self._rates) // 4]', 'sorted(self._rates)[-1]',
      'tests/test_keep_pays.py::test_the_disk_rate_is_the_slow_quartile_of_the_reads'),
    M('kept-block-saves-no-recompute-when-streamed', 'slowllama/engine/keep_cost.py',
      '(2 if i >= first_kept else 3) * forward_s', '3 * forward_s',
      'tests/test_keep_pays.py::test_the_streamed_step_takes_the_longer_of_each_blocks_read_and_compute '
      'tests/test_keep_pays.py::test_read_from_disk_each_step_the_memory_goes_where_the_step_is_waiting'),
    M('never-planned-again-at-the-disks-rate', 'slowllama/engine/planner.py',
      '        rate = self.store.read_rate() if self._streams_every_block else None\n', '        rate = None\n',
      'tests/test_keep_pays.py::test_a_run_reading_every_block_from_disk_plans_again_once_it_knows_the_disks_rate'),
]

def check(mutants, root=ROOT):
    """-> [problem]: a fragment not found exactly once, a replacement equal to it."""
    problems = []
    for m in mutants:
        path = os.path.join(root, m.file)
        if not os.path.exists(path):
            problems.append(f'{m.name}: {m.file} does not exist')
            continue
        with open(path, encoding='utf-8') as f:
            count = f.read().count(m.fragment)
        if count != 1:
            problems.append(f'{m.name}: the fragment is found {count} times in {m.file}: {m.fragment!r}')
        if m.fragment == m.replacement:
            problems.append(f'{m.name}: the replacement is the fragment')
    names = [m.name for m in mutants]
    problems += [f'{n}: two mutants have this name' for n in sorted({n for n in names if names.count(n) > 1})]
    return problems


def copy_repository(root, target):
    for name in COPIED:
        source = os.path.join(root, name)
        if os.path.isdir(source):
            shutil.copytree(source, os.path.join(target, name),
                            ignore=shutil.ignore_patterns('__pycache__', '*.egg-info', '.pytest_cache'))
        elif os.path.exists(source):
            shutil.copy2(source, os.path.join(target, name))


def run_tests(copy, tests, timeout, log_path):
    """-> (pytest's exit code, or 'timeout', seconds)."""
    env = {**os.environ, 'PYTHONPATH': os.pathsep.join([copy, os.environ.get('PYTHONPATH', '')]).rstrip(os.pathsep),
           'PYTHONDONTWRITEBYTECODE': '1'}
    command = [sys.executable, '-m', 'pytest', '-x', '-q', '-p', 'no:cacheprovider', *tests.split()]
    started = time.monotonic()
    with open(log_path, 'w') as log:
        try:
            code = subprocess.run(command, cwd=copy, env=env, stdout=log, stderr=subprocess.STDOUT,
                                  timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            code = 'timeout'
    return code, time.monotonic() - started


def verdict(code):
    return {0: 'SURVIVED', 1: 'caught'}.get(code, f'error ({code})')


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('names', nargs='*', help='mutants to run (default: all)')
    p.add_argument('--list', action='store_true', help='print the table and stop')
    p.add_argument('--check', action='store_true', help='only check that each fragment is found exactly once')
    p.add_argument('--no-baseline', action='store_true', help='skip the run of the tests on the unchanged copy')
    p.add_argument('--timeout', type=float, default=1200, help='seconds per mutant')
    p.add_argument('--keep', action='store_true', help='keep the copy and the logs (printed at the end)')
    p.add_argument('--root', default=ROOT, help='the repository to copy (default: this one), e.g. a worktree of '
                   'an older commit, to see whether its tests catch these mutants')
    p.add_argument('--tests', default=None, help='run these tests for every mutant instead of the named ones')
    args = p.parse_args()
    unknown = set(args.names) - {m.name for m in MUTANTS}
    if unknown:
        p.error(f'unknown mutants: {", ".join(sorted(unknown))} (see --list)')
    mutants = [m for m in MUTANTS if not args.names or m.name in args.names]
    if args.tests:
        mutants = [m._replace(tests=args.tests) for m in mutants]
    if args.list:
        for m in mutants:
            print(f'{m.name}\n  {m.file}: {m.fragment!r}\n  -> {m.replacement!r}\n  tests: {m.tests}')
        return 0
    problems = check(mutants, args.root)
    if problems or args.check:
        print('\n'.join(problems) or f'{len(mutants)} mutants, each fragment found once')
        return 1 if problems else 0

    work = tempfile.mkdtemp(prefix='slowllama-mutants-')
    copy = os.path.join(work, 'repo')
    os.makedirs(copy)
    copy_repository(args.root, copy)
    results = []
    try:
        if not args.no_baseline:
            tests = ' '.join(dict.fromkeys(t for m in mutants for t in m.tests.split()))
            code, seconds = run_tests(copy, tests, args.timeout * 2, os.path.join(work, 'baseline.log'))
            print(f'baseline: the named tests on the unchanged code: exit {code} ({seconds:.0f}s)', flush=True)
            if code != 0:
                print(f'a named test fails without any mutant; see {work}/baseline.log')
                return 1
        for m in mutants:
            path = os.path.join(copy, m.file)
            with open(path, encoding='utf-8') as f:
                original = f.read()
            with open(path, 'w', encoding='utf-8') as f:
                f.write(original.replace(m.fragment, m.replacement, 1))
            try:
                code, seconds = run_tests(copy, m.tests, args.timeout, os.path.join(work, f'{m.name}.log'))
            finally:
                with open(path, 'w', encoding='utf-8') as f:
                    f.write(original)
            results.append((m, verdict(code)))
            print(f'{verdict(code):<9} {m.name:<32} {seconds:5.0f}s  {m.file}', flush=True)
    finally:
        if not args.keep and all(v == 'caught' for _, v in results):
            shutil.rmtree(work, ignore_errors=True)
    bad = [(m, v) for m, v in results if v != 'caught']
    print(f'\n{len(results) - len(bad)} of {len(results)} mutants caught')
    for m, v in bad:
        print(f'{v}: {m.name} ({m.file}); log: {work}/{m.name}.log')
    return 1 if bad else 0


if __name__ == '__main__':
    sys.exit(main())
