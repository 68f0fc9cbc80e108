"""The streamed model: forward one block at a time, manual backward from the last block to the first.

Forward: embeddings -> block 0 .. n-1 -> head, each block's weights fetched from the store, used and
dropped. Before each block we keep its input (the "saved inputs") and the RNG state, so that the
backward can restore the state, recompute the block under autograd with the same dropout masks, push
the output gradient through and hand the input gradient to the block before. Only the LoRA matrices
(and an optional prefix encoder) hold gradients; they live on the device for the whole run.
"""

import functools
import shutil
from typing import NamedTuple

import torch
from torch.func import functional_call

from ..errors import SlowLlamaError
from ..generation.decode import GenerationCache, is_eos, sample
from ..model.block import Block, document_mask, rope_changes_past, rope_table
from ..model.lora import LoraConfig, adapter_state, attach, disabled, load_adapter_state
from ..weights.files import announce, clean_leftovers, staging_dir, swap_dir
from ..weights.formats.peft import save_adapter_folder
from ..weights.host_memory import HeapTrimmer, free_device_memory, free_host_memory, host_share, unified_memory
from .plan import cap_budget, plan_step, step_working_bytes
from ..weights.prepared import dtype_name
from .devices import set_rng_state
from .head import IGNORE, StreamedHead
from .experts import expert_fetcher, kept_experts
from .kept import KeptBlock
from .recompute import TAIL_WEIGHT, UnreadProductWeight
from .stash import InputStash, spill_room
from .trip import MicroBatch, rng_streams, run_trip


class Layout(NamedTuple):
    """What every block needs besides its input: the rope tables and, for packed documents, the
    attention mask (None: causal over the whole row)."""
    cos: torch.Tensor  # [seq, head_dim] or [batch, seq, head_dim]
    sin: torch.Tensor
    mask: torch.Tensor | None = None  # [batch, 1, seq, seq] bool


def streamed_pass(training):
    """Run a method in train or eval mode; if it raises (out of memory, Ctrl-C), hand every block
    it held back to the store so the device buffers are free for the next call."""
    def wrap(method):
        @functools.wraps(method)
        def run(self, *args, **kwargs):
            self._set_training(training)
            try:
                return method(self, *args, **kwargs)
            except BaseException:
                self.store.release_all()
                raise
        return run
    return wrap


class StreamedModel:
    def __init__(self, store, lora: LoraConfig, dropout=0.0, lora_dtype=torch.float32,
                 stash_device_bytes=None, stash_ram_bytes=None, micro_batches_per_trip=None, keep_activations='auto'):
        """stash_device_bytes, stash_ram_bytes: caps on the saved inputs' device and RAM tiers (None:
        the step plan's); micro_batches_per_trip: how many of a step's micro-batches travel through the
        blocks together (None: the step plan's choice, as many as fit); keep_activations: 'auto' (the
        last blocks whose activations fit keep them, the others are recomputed in the backward),
        'all', 'none', or a number of blocks."""
        self.store, self.cfg, self.lora = store, store.cfg, lora
        self.device, self.dtype = store.device, store.dtype
        with torch.device('meta'):  # module skeletons only: the frozen weights come from the store per call
            self.blocks = [Block(self.cfg, dropout) for _ in range(self.cfg.n_layers)]
        self.head = StreamedHead(store)
        self.adapters = [attach(block, lora, self.device, lora_dtype) for block in self.blocks]
        self._block_params = [[p for adapter in layer.values() for p in (adapter.lora_A.weight, adapter.lora_B.weight)]
                              for layer in self.adapters]
        self.stash_caps = (stash_device_bytes, stash_ram_bytes)
        self.trip_size, self.keep = micro_batches_per_trip, parse_keep(keep_activations)
        self.dropout = dropout
        self.step_plan, self._planned_for = None, None
        self.trim_host_heap = HeapTrimmer() if self.device.type == 'cpu' else (lambda: None)
        self.attached = {}  # name -> trainable nn.Module beside the LoRA (the BCI encoder)

    # --- the public API ------------------------------------------------------------------

    def trainable_parameters(self):
        """PEFT-style name -> Parameter, for the optimizer; then '<name>.<param>' of attached modules."""
        params = adapter_state(self.adapters)
        for name, module in self.attached.items():
            params.update({f'{name}.{key}': p for key, p in module.named_parameters()})
        return params

    def attach_module(self, name, module):
        """Train `module` (resident on the device) with the LoRA: its parameters join
        trainable_parameters() as '<name>.<param>', and save_adapter calls module.save(folder)."""
        self.attached[name] = module
        return module

    @torch.no_grad()
    def embed(self, tokens):
        """[batch, seq] tokens -> their embeddings [batch, seq, dim] on the device, in the compute dtype."""
        return self.store.embed(tokens.to(self.device))

    @torch.no_grad()
    @streamed_pass(training=False)
    def logits(self, tokens, prefix=None, positions=None):
        """[batch, seq] tokens -> float32 logits [batch, seq, vocab] (prefix positions dropped).
        positions [batch, seq]: packed documents, each restarting at 0 (its own rope positions, and
        attention within the document only); default: one sequence per row."""
        x, layout = self._embed(tokens, prefix, positions)
        x = self._forward_blocks(x, layout)
        return self.head.logits(x[:, x.shape[1] - tokens.shape[1]:])

    def backward(self, tokens, targets, prefix=None, positions=None, weigh=None):
        """Streamed forward + manual backward. targets[b, t] is the token expected after tokens[b, :t+1]
        (-100: ignored). Accumulates .grad on the trainable parameters (and into `prefix` when it
        requires grad); returns the mean loss over the counted targets as a float. positions: as
        for logits(). weigh: another loss on the per-token log-probs (StreamedHead.loss_and_grad)."""
        return self.accumulate([MicroBatch(tokens, targets, positions, prefix, weigh)])[0]

    @streamed_pass(training=True)
    def accumulate(self, batches, shares=None):
        """The micro-batches of one optimizer step (MicroBatch), in trips (engine/trip.py): adds to
        .grad the gradient of sum_k shares[k] * loss_k, loss_k the mean loss of micro-batch k (shares
        default to 1), each micro-batch's gradient formed alone and added in order, as a loop of
        backward() calls would; returns the losses. Micro-batch k > 0 draws its dropout from a stream
        of its own (trip.rng_streams); the global RNG ends as after micro-batch 0's forward."""
        shares = [1.0] * len(batches) if shares is None else list(shares)
        plan = self.plan_step(batches)
        streams = rng_streams(self.device, len(batches))
        losses = []
        for start in range(0, len(batches), plan.trip):
            trip = slice(start, start + plan.trip)
            trip_streams, stash = streams[trip], self._new_stash(plan)
            try:
                losses += run_trip(self, batches[trip], shares[trip], trip_streams, stash, plan.kept_blocks)
            finally:
                stash.close()
            streams[trip] = trip_streams
        set_rng_state(self.device, streams[0])  # as if the backward drew nothing, like autograd
        return losses

    def traffic(self):
        """{'bytes_read', 'bytes_to_device'} so far: what the store read from the model's files (as a
        disk would serve it, page cache or not) and copied to the device (0 on a cpu)."""
        return dict(self.store.traffic)

    def plan_step(self, batches):
        """The StepPlan (engine/plan.py) for these micro-batches."""
        batch, seq = batches[0].tokens.shape
        seq += 0 if batches[0].prefix is None else batches[0].prefix.shape[1]
        return self.plan_for(len(batches), batch, seq, packed=batches[0].positions is not None)

    def plan_for(self, micro_batches, batch, seq, packed=False):
        """The StepPlan for `micro_batches` of batch x seq, made once per shape from the memory free
        now: how many travel together, which blocks keep their activations, where saved inputs wait.
        Raises SlowLlamaError when what was asked cannot fit (--keep-activations all, say)."""
        shape = (micro_batches, batch, seq, packed)
        if shape != self._planned_for:
            budget, ram, page_cache = self._step_budgets()
            dtype = dtype_name(self.dtype)
            working = step_working_bytes(self.cfg, batch, seq, dtype, micro_batches)
            self.step_plan = plan_step(
                self.cfg, batch, seq, dtype, micro_batches, budget, ram, disk_budget=spill_room(),
                keep_reserve=page_cache, trip=self.trip_size, keep=self.keep, working=working,
                host_heap=self.device.type == 'cpu',
                targets=self.lora.targets, rank=self.lora.rank, dropout=self.dropout, lora_dropout=self.lora.dropout,
                device_type=self.device.type, packed=packed)
            self._planned_for = shape
            if isinstance(self.trim_host_heap, HeapTrimmer):  # what the next step reuses stays in the heap
                self.trim_host_heap.slack = max(HeapTrimmer.SLACK, self.step_plan.kept_bytes + working)
        return self.step_plan

    @torch.no_grad()
    @streamed_pass(training=False)
    def loss(self, tokens, targets, prefix=None, positions=None):
        """Mean cross-entropy against targets (-100 ignored) in eval mode, without gradients: the
        validation loss, through the same streamed head as backward."""
        tokens, targets = tokens.to(self.device), targets.to(self.device)
        x, layout = self._embed(tokens, prefix, positions)
        x = self._forward_blocks(x, layout)
        return self.head.loss(x, self._with_prefix_targets(targets, prefix))

    @torch.no_grad()
    @streamed_pass(training=False)
    def token_logprobs(self, tokens, targets, positions=None):
        """Eval mode, no gradients: the log-prob of each target [batch, seq] (float32, 0 where -100)."""
        tokens, targets = tokens.to(self.device), targets.to(self.device)
        x, layout = self._embed(tokens, None, positions)
        return self.head.token_logprobs(self._forward_blocks(x, layout), targets)

    def lora_disabled(self):
        """Context manager: the base model within (every LoRA bypassed), as PEFT's disable_adapter()."""
        return disabled(self.adapters)

    @torch.no_grad()
    @streamed_pass(training=False)
    def generate(self, tokens, max_new_tokens, temperature=0.0, top_p=1.0, prefix=None, on_token=None, cache=None):
        """[1, T] -> [1, T + n] with a KV cache; greedy at temperature 0. Stops early at EOS.
        on_token(id) is called as each token is chosen (for printing as we go). cache: a
        GenerationCache (new_cache()) kept between calls; `tokens` then continue the tokens it holds,
        and only they go through the blocks (a conversation's new turn)."""
        tokens = tokens.to(self.device)
        cache = self.new_cache() if cache is None else cache
        if prefix is not None and cache.tokens:
            raise ValueError('a prefix can only start a sequence, not continue a cached one')
        x, _ = self._embed(tokens, prefix)
        cache.reserve(x.shape[1] + max_new_tokens)
        out, fed = tokens, tokens[0].tolist()
        for _ in range(max_new_tokens):
            position = cache.length
            if position and rope_changes_past(self.cfg, position, position + x.shape[1]):  # recompute the cache
                fed = cache.tokens + fed
                cache.keep(0)
                x, position = self._embed(torch.tensor([fed], device=self.device), prefix)[0], 0
                cache.reserve(x.shape[1] + max_new_tokens)
            cos, sin = rope_table(self.cfg, torch.arange(position, position + x.shape[1]), self.device)
            x = self._forward_blocks(x, Layout(cos, sin), caches=cache.layers)
            cache.tokens += fed
            logits = self.head.logits(x[:, -1])
            next_token = sample(logits, temperature, top_p)
            out = torch.cat([out, next_token], dim=1)
            if on_token:
                on_token(int(next_token))
            if is_eos(self.cfg, int(next_token)):
                break
            x, fed = self.store.embed(next_token), [int(next_token)]
        return out

    def new_cache(self):
        """An empty GenerationCache for generate(cache=...)."""
        return GenerationCache(self.cfg, self.device, self.dtype)

    def save_adapter(self, folder, base_model=None):
        """Write the adapter folder whole: beside it first, then swapped in (never half old, half new)."""
        announce(clean_leftovers(folder))  # what an earlier, interrupted save left beside it
        staging = staging_dir(folder)
        try:
            save_adapter_folder(staging, self.lora, self.trainable_adapter_state(),
                                base_model or self.store.model_dir)
            for module in self.attached.values():
                module.save(staging)
            swap_dir(staging, folder)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def trainable_adapter_state(self):
        return adapter_state(self.adapters)

    def load_adapter_state(self, state, where='adapter'):
        load_adapter_state(self.adapters, state, where)

    # --- internals -----------------------------------------------------------------------

    def _set_training(self, mode):
        for block in self.blocks:
            block.train(mode)

    @staticmethod
    def _with_prefix_targets(targets, prefix):
        """No target for the prefix positions."""
        if prefix is None:
            return targets
        return torch.cat([targets.new_full((targets.shape[0], prefix.shape[1]), IGNORE), targets], dim=1)

    def _embed(self, tokens, prefix, positions=None):
        """-> embeddings [batch, seq, dim] (after the prefix, if any) and the rows' Layout."""
        x = self.store.embed(tokens)  # [batch, seq, dim]
        if prefix is not None:
            if positions is not None:
                raise ValueError('packed positions and a prefix cannot be combined')
            x = torch.cat([prefix.to(self.device, self.dtype), x], dim=1)
        if positions is None:
            return x, Layout(*rope_table(self.cfg, torch.arange(x.shape[1]), self.device))
        positions = positions.to(self.device)
        return x, Layout(*rope_table(self.cfg, positions, self.device), document_mask(positions))

    def _forward_blocks(self, x, layout, caches=None):
        """x through every block (no autograd), each fetched from the store while the next one travels."""
        last = self.cfg.n_layers - 1
        for i in range(last + 1):
            weights = self.store.block(i)
            self.store.prefetch(i + 1 if i < last else None)
            x = self.run_block(i, weights, x, layout, caches[i] if caches else None)
            del weights
            self.store.release(i)
        return x

    # --- what a trip (engine/trip.py) does with one block and one micro-batch ------------------

    def trip_input(self, batch):
        """A MicroBatch's embeddings (after its prefix) [batch, seq, dim], Layout and targets (none for
        the prefix positions), on the device."""
        tokens, targets = batch.tokens.to(self.device), batch.targets.to(self.device)
        prefix = batch.prefix.detach() if batch.prefix is not None else None
        with torch.no_grad():
            x, layout = self._embed(tokens, prefix, batch.positions)
        return x, layout, self._with_prefix_targets(targets, batch.prefix)

    def run_block(self, i, weights, x, layout, cache=None, names=None):
        """Block i with the frozen `weights` the store handed out, and its LoRA. A MoE block asks the
        store for the experts its router chose (names: a kept block's WeightNames, told of them too)."""
        fetch = expert_fetcher(self.store, i, names) if self.cfg.n_experts else None
        arguments = (x, layout.cos, layout.sin, cache, layout.mask, fetch)
        return functional_call(self.blocks[i], weights, arguments, strict=False)

    def block_backward(self, i, weights, block_input, grad_output, rng_state, layout, share=1.0):
        """Recompute block i under autograd with the forward's RNG state, push grad_output through:
        adds share * the LoRA gradients to their .grad and returns d loss / d input."""
        block_input = block_input.detach().requires_grad_(True)
        if TAIL_WEIGHT in weights:  # a MoE block ends in its experts' sum instead
            weights = {**weights, TAIL_WEIGHT: UnreadProductWeight(weights[TAIL_WEIGHT])}
        set_rng_state(self.device, rng_state)
        with torch.enable_grad():
            output = self.run_block(i, weights, block_input, layout)  # only its gradient is used
        return self._push_gradient(i, block_input, output, grad_output, share)

    def run_block_keeping(self, i, weights, names, x, layout):
        """Block i under autograd, its graph kept for the backward (its weights by name: kept.py)
        -> (output, detached, KeptBlock)."""
        leaf = x.detach().requires_grad_(True)
        with torch.enable_grad(), names.hooks():
            output = self.run_block(i, weights, leaf, layout, names=names)
        return output.detach(), KeptBlock(leaf, output, names)

    def kept_backward(self, i, weights, kept, grad_output, share=1.0):
        """Push grad_output through block i's kept graph, its weights resolved to this fetch: adds
        share * the LoRA gradients to their .grad and returns d loss / d input."""
        kept.names.fetched = {**weights, **kept_experts(self.store, i, kept.names)}
        try:
            return self._push_gradient(i, kept.input, kept.output, grad_output, share)
        finally:
            kept.names.fetched = None

    def _push_gradient(self, i, block_input, output, grad_output, share):
        """grad_output through block i's graph from block_input to output: share * the LoRA gradients
        into their .grad; returns d loss / d block_input."""
        params = self._block_params[i]
        grads = torch.autograd.grad(output, [block_input, *params], grad_output, allow_unused=True)
        add_gradients(params, grads[1:], share)
        return grads[0]

    def prefix_backward(self, prefix, grad, share=1.0):
        """share * d loss / d prefix into what made the prefix: the attached modules' parameters add
        it to their .grad (a prefix that is a leaf of its own gets the plain gradient)."""
        params = [p for module in self.attached.values() for p in module.parameters() if p.requires_grad]
        held = [p.grad for p in params]
        for p in params:
            p.grad = None
        prefix.backward(grad.to(prefix.dtype))
        grads = [p.grad for p in params]
        for p, before in zip(params, held):
            p.grad = before
        add_gradients(params, grads, share)

    def _new_stash(self, plan):
        """Where a trip's saved inputs wait: the plan's room on the device, then RAM (on a cpu both are
        the host's), then disk; a cap given at load wins."""
        device_cap, ram_cap = self.stash_caps
        device_room = plan.stash_device_bytes if device_cap is None else device_cap
        ram_room = plan.stash_ram_bytes if ram_cap is None else ram_cap
        if self.device.type == 'cpu':
            ram_room = device_room if ram_cap is None else ram_cap
        return InputStash(self.device, device_room, ram_room)

    def _step_budgets(self):
        """-> (bytes the step may take on the device, host bytes for what spills there, the part of the
        first that kept activations must leave alone). cuda: its free memory, and RAM beside it. A cpu
        or a Mac: the one memory, less the blocks the store holds mapped at once; and where blocks
        are read from files, the page cache would like to keep them, so kept activations leave it
        their bytes (a model larger than memory is bound by its reads, not by the recompute). 90% of
        what is free, within --max-device-mem / --max-ram."""
        store = self.store
        if self.device.type == 'cpu' or unified_memory(self.device):
            free = free_host_memory() if self.device.type == 'cpu' else free_device_memory(self.device)
            mapped = store.disk_tier_bytes()
            held = 2 * mapped['block'] if mapped['blocks'] else 0  # the last two blocks stay for the backward
            budget = cap_budget(free, store.max_device_mem) - store.unallocated_device_bytes() - held
            return max(0, budget), 0, mapped['total']
        budget = cap_budget(free_device_memory(self.device), store.max_device_mem) - store.unallocated_device_bytes()
        return max(0, budget), cap_budget(free_host_memory() // host_share(), store.max_ram), 0


def parse_keep(keep):
    """--keep-activations: 'auto', 'all', 'none' or a number of blocks (the last ones)."""
    if keep in ('auto', 'all', 'none'):
        return keep
    try:
        blocks = int(keep)
    except (TypeError, ValueError):
        blocks = -1
    if blocks < 0:
        raise SlowLlamaError(f'--keep-activations: {keep!r} is not auto, all, none or a number of blocks')
    return blocks


def add_gradients(params, grads, share):
    """p.grad += share * g for each parameter that has a gradient: the step's weighted sum of its
    micro-batches' gradients, formed in their order (the same arithmetic as summing them afterwards)."""
    for p, g in zip(params, grads):
        if g is not None:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            p.grad.add_(g, alpha=share)
