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
import torch.nn.functional as F
from torch.func import functional_call

from ..model.block import Block, document_mask, rope_changes_past, rope_table
from ..model.lora import LoraConfig, adapter_state, attach, disabled, load_adapter_state
from ..weights.files import announce, clean_leftovers, staging_dir, swap_dir
from ..weights.formats.peft import save_adapter_folder
from .devices import HeapTrimmer, get_rng_state, set_rng_state
from .generation import GenerationCache, is_eos, sample
from .head import IGNORE, StreamedHead
from .stash import InputStash



TRIM_EVERY_BLOCKS = 4  # on a CPU, hand freed heap memory back to the OS this often in the backward
TAIL_WEIGHT = 'mlp.down_proj.weight'  # the block's last product: only adds and dropout come after it


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
                 stash_device_bytes=None, stash_ram_bytes=None):
        self.store, self.cfg, self.lora = store, store.cfg, lora
        self.device, self.dtype = store.device, store.dtype
        with torch.device('meta'):  # module skeletons only: the frozen weights come from the store per call
            self.blocks = [Block(self.cfg, dropout) for _ in range(self.cfg.n_layers)]
        self.head = StreamedHead(store)
        self.adapters = [attach(block, lora, self.device, lora_dtype) for block in self.blocks]
        self.stash_budget = (stash_device_bytes, stash_ram_bytes)
        self._trim_host_heap = HeapTrimmer() if self.device.type == 'cpu' else (lambda: None)
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

    @streamed_pass(training=True)
    def backward(self, tokens, targets, prefix=None, positions=None, weigh=None):
        """Streamed forward + manual backward. targets[b, t] is the token expected after tokens[b, :t+1]
        (-100: ignored). Accumulates .grad on the trainable parameters (and into `prefix` when it
        requires grad); returns the mean loss over the counted targets as a float. positions: as
        for logits(). weigh: another loss on the per-token log-probs (StreamedHead.loss_and_grad)."""
        tokens, targets = tokens.to(self.device), targets.to(self.device)
        with torch.no_grad():
            x, layout = self._embed(tokens, prefix.detach() if prefix is not None else None, positions)
        targets = self._with_prefix_targets(targets, prefix)
        stash, rng_states = InputStash(self.device, *self.stash_budget), []

        def keep_input(i, block_input):
            stash.put(i, block_input)
            rng_states.append(get_rng_state(self.device))

        with torch.no_grad():
            x = self._forward_blocks(x, layout, before_block=keep_input, keep_last=True)
        rng_after_forward = get_rng_state(self.device)
        self._trim_host_heap()
        loss, grad = self.head.loss_and_grad(x, targets, weigh)
        del x
        for i in reversed(range(self.cfg.n_layers)):
            weights = self.store.block(i)  # the last block is still on the device from the forward
            self.store.prefetch(i - 1)
            grad = self._block_backward(i, weights, stash.pop(i), grad, rng_states[i], layout)
            del weights
            self.store.release(i)
            if i % TRIM_EVERY_BLOCKS == 0:
                self._trim_host_heap()
        stash.close()
        set_rng_state(self.device, rng_after_forward)  # as if the backward drew nothing, like autograd
        if prefix is not None and prefix.requires_grad:
            prefix.backward(grad[:, :prefix.shape[1]].to(prefix.dtype))
        return loss

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

    def _run_block(self, i, weights, x, layout, cache=None):
        arguments = (x, layout.cos, layout.sin, cache, layout.mask)
        return functional_call(self.blocks[i], weights, arguments, strict=False)

    def _forward_blocks(self, x, layout, caches=None, before_block=None, keep_last=False):
        """x through every block, each fetched from the store while the next one is prefetched.
        keep_last: leave the last block on the device (the backward starts with it)."""
        last = self.cfg.n_layers - 1
        for i in range(self.cfg.n_layers):
            if before_block:
                before_block(i, x)
            weights = self.store.block(i)
            self.store.prefetch(i + 1 if i < last else (last - 1 if keep_last else None))
            x = self._run_block(i, weights, x, layout, caches[i] if caches else None)
            del weights
            if not (keep_last and i == last):
                self.store.release(i)
        return x

    def _block_backward(self, i, weights, block_input, grad_output, rng_state, layout):
        """Recompute block i under autograd with the forward's RNG state; return d loss / d input."""
        block_input = block_input.detach().requires_grad_(True)
        weights = {**weights, TAIL_WEIGHT: UnreadProductWeight(weights[TAIL_WEIGHT])}
        set_rng_state(self.device, rng_state)
        with torch.enable_grad():
            output = self._run_block(i, weights, block_input, layout)  # only its gradient is used
        torch.autograd.backward(output, grad_output)
        return block_input.grad


class UnreadProductWeight(torch.Tensor):
    """The frozen weight of a block's last linear while the block is recomputed for its backward.

    That pass is run for its gradients only, and what follows the last product (LoRA's addition,
    dropout, the residual add) needs no value of it to pass a gradient back. So F.linear with this
    weight skips the product, a fifth of the block's forward FLOPs at Llama's shapes, and returns
    zeros; its backward still hands the input its gradient. torch.utils.checkpoint's early stop
    saves the same product."""

    def __new__(cls, weight):
        return torch.Tensor._make_subclass(cls, weight)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        bias = args[2] if len(args) > 2 else (kwargs or {}).get('bias')
        if func is F.linear and isinstance(args[1], cls) and bias is None:
            return _InputGradientOnly.apply(args[0], args[1].as_subclass(torch.Tensor))
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **(kwargs or {}))


class _InputGradientOnly(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight):  # x [..., in], weight [out, in] (frozen)
        ctx.save_for_backward(weight)
        return x.new_zeros(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad):  # grad [..., out] -> d/dx [..., in]
        weight, = ctx.saved_tensors
        return grad @ weight, None
