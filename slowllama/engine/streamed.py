"""The streamed model: forward one block at a time, manual backward from the last block to the first.

StreamedModel is the public face (CONTRACT's model.*): it holds the model's parts (forward.Parts:
the store, the block skeletons with their LoRA, the streamed head) and the step's planner, and hands
each call to the module that does it: the forward (forward.py), a training step in trips (trip.py,
on the plan planner.py made at load), generation (generation/decode.py), the adapter's files
(weights/formats/peft.py). Only the LoRA matrices (and an optional prefix encoder) hold gradients;
they live on the device for the whole run.
"""

import functools

import torch

from ..generation import decode
from ..model.block import Block, scale_embeddings
from ..model.lora import LoraConfig, adapter_state, attach, disabled, load_adapter_state
from ..weights.formats.peft import write_adapter
from ..weights.host_memory import HeapTrimmer
from .forward import Parts, embed, forward_blocks, with_prefix_targets
from .head import StreamedHead
from .options import EngineOptions
from .planner import StepPlanner
from .trip import MicroBatch, run_step


def router_aux_coef(cfg, lora, options):
    """The load-balancing loss's weight in a training step: on while the router trains (as transformers
    with output_router_logits), at the model config's router_aux_loss_coef unless the options say."""
    if 'router' not in lora.targets:
        return 0.0
    coef = options.router_aux_loss_coef
    return float(cfg.router_aux_loss_coef if coef is None else coef)


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
    def __init__(self, store, lora: LoraConfig, dropout=0.0, lora_dtype=torch.float32, options=None):
        """options: the EngineOptions the step is planned from (its keep_activations,
        micro_batches_per_trip, grad_accum and step shape, memory caps); the plan is made here, once."""
        self.store, self.cfg, self.lora = store, store.cfg, lora
        self.device, self.dtype = store.device, store.dtype
        self.options = options or EngineOptions()
        with torch.device('meta'):  # module skeletons only: the frozen weights come from the store per call
            self.blocks = [Block(self.cfg, dropout, i) for i in range(self.cfg.n_layers)]
        self.head = StreamedHead(store)
        self.adapters = [attach(block, lora, self.device, lora_dtype) for block in self.blocks]
        block_params = [[p for adapter in layer.values() for p in (adapter.lora_A.weight, adapter.lora_B.weight)]
                        for layer in self.adapters]
        self.attached = {}  # name -> trainable nn.Module beside the LoRA (the BCI encoder)
        trim_host_heap = HeapTrimmer() if self.device.type == 'cpu' else (lambda: None)
        self.parts = Parts(store, self.blocks, block_params, self.head, self.attached, trim_host_heap,
                           router_aux_coef(self.cfg, lora, self.options))
        self.planner = StepPlanner(store, lora, dropout, self.options, trim_host_heap)

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
        return scale_embeddings(self.cfg, self.store.embed(tokens.to(self.device)))

    @torch.no_grad()
    @streamed_pass(training=False)
    def logits(self, tokens, prefix=None, positions=None):
        """[batch, seq] tokens -> float32 logits [batch, seq, vocab] (prefix positions dropped).
        positions [batch, seq]: packed documents, each restarting at 0 (its own rope positions, and
        attention within the document only); default: one sequence per row."""
        x, layout = embed(self.store, tokens, prefix, positions)
        x = forward_blocks(self.store, self.blocks, x, layout)
        return self.head.logits(x[:, x.shape[1] - tokens.shape[1]:])

    def backward(self, tokens, targets, prefix=None, positions=None, weigh=None):
        """Streamed forward + manual backward. targets[b, t] is the token expected after tokens[b, :t+1]
        (-100: ignored). Accumulates .grad on the trainable parameters (and into `prefix` when it
        requires grad); returns the mean loss over the counted targets as a float. positions: as
        for logits(). weigh: another loss on the per-token log-probs (StreamedHead.loss_and_grad)."""
        return self.accumulate([MicroBatch(tokens, targets, positions, prefix, weigh)])[0]

    @streamed_pass(training=True)
    def accumulate(self, batches, shares=None):
        """The micro-batches of one optimizer step (MicroBatch), in trips (engine/trip.py) on the step's
        plan: adds to .grad the gradient of sum_k shares[k] * loss_k, loss_k the mean loss of
        micro-batch k (shares default to 1), each micro-batch's gradient formed alone and added in
        order, as a loop of backward() calls would; returns the losses."""
        shares = [1.0] * len(batches) if shares is None else list(shares)
        batch, seq = batches[0].tokens.shape
        seq += 0 if batches[0].prefix is None else batches[0].prefix.shape[1]
        plan = self.planner.for_step(len(batches), batch, seq, packed=batches[0].positions is not None)
        return run_step(self.parts, plan, batches, shares)

    @property
    def step_plan(self):
        """The StepPlan (engine/plan.py) of the last step; before any, the one planned at load."""
        return self.planner.current

    def traffic(self):
        """{'bytes_read', 'bytes_to_device'} so far: what the store read from the model's files (as a
        disk would serve it, page cache or not) and copied to the device (0 on a cpu)."""
        return dict(self.store.traffic)

    @torch.no_grad()
    @streamed_pass(training=False)
    def loss(self, tokens, targets, prefix=None, positions=None):
        """Mean cross-entropy against targets (-100 ignored) in eval mode, without gradients: the
        validation loss, through the same streamed head as backward."""
        tokens, targets = tokens.to(self.device), targets.to(self.device)
        x, layout = embed(self.store, tokens, prefix, positions)
        x = forward_blocks(self.store, self.blocks, x, layout)
        return self.head.loss(x, with_prefix_targets(targets, prefix))

    @torch.no_grad()
    @streamed_pass(training=False)
    def token_logprobs(self, tokens, targets, positions=None):
        """Eval mode, no gradients: the log-prob of each target [batch, seq] (float32, 0 where -100)."""
        tokens, targets = tokens.to(self.device), targets.to(self.device)
        x, layout = embed(self.store, tokens, None, positions)
        return self.head.token_logprobs(forward_blocks(self.store, self.blocks, x, layout), targets)

    def lora_disabled(self):
        """Context manager: the base model within (every LoRA bypassed), as PEFT's disable_adapter()."""
        return disabled(self.adapters)

    @torch.no_grad()
    @streamed_pass(training=False)
    def generate(self, tokens, max_new_tokens, temperature=0.0, top_p=1.0, prefix=None, on_token=None, cache=None):
        """[1, T] -> [1, T + n] with a KV cache, greedy at temperature 0 (generation/decode.py)."""
        return decode.generate(self.parts, tokens, max_new_tokens, temperature, top_p, prefix, on_token, cache)

    def new_cache(self):
        """An empty GenerationCache for generate(cache=...)."""
        return decode.GenerationCache(self.cfg, self.device, self.dtype)

    def save_adapter(self, folder, base_model=None):
        """The adapter folder in PEFT's layout, written whole (weights/formats/peft.py)."""
        write_adapter(folder, self.lora, self.trainable_adapter_state(), base_model or self.store.model_dir,
                      self.attached.values())

    def trainable_adapter_state(self):
        return adapter_state(self.adapters)

    def load_adapter_state(self, state, where='adapter'):
        load_adapter_state(self.adapters, state, where)

    def _set_training(self, mode):
        for block in self.blocks:
            block.train(mode)
