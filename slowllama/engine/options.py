"""The engine's settings, one typed group: where the frozen weights live (offload and the memory
caps the plans keep within) and how a step runs (its micro-batches, how many travel together, which
blocks keep their activations). slowllama.load(..., options=EngineOptions(...)) takes them once; the
placement (placement.py) and the step's planner (planner.py) read them from here and nowhere else.

Errors name the setting (`keep_activations: ...`); the recipes name their flags instead."""
from dataclasses import dataclass

from ..errors import SlowLlamaError

KEEP_MODES = ('auto', 'all', 'none')


@dataclass(frozen=True)
class EngineOptions:
    offload: str = 'auto'              # 'auto' | 'disk' | 'ram' | 'device' (placement.py)
    max_device_mem: int | None = None  # bytes the plans may take of the device's free memory (None: 90% of it)
    max_ram: int | None = None         # the same for host RAM
    keep_activations: str | int = 'auto'  # 'auto' | 'all' | 'none' | the last N blocks keep their graph
    micro_batches_per_trip: int | None = None  # None: as many as fit
    grad_accum: int = 1                # micro-batches of one optimizer step: the step planned at load
    batch_hint: tuple = (4, 512)       # rows x positions of one micro-batch, for the placement and the plan
    step_rows: int | None = None       # rows of a step's micro-batch when not batch_hint's (DPO: two a pair)
    packed: bool = False               # the step's rows hold packed documents (their mask is kept too)
    stash_device_bytes: int | None = None  # caps on the saved inputs' device and RAM tiers (None: the plan's)
    stash_ram_bytes: int | None = None
    router_aux_loss_coef: float | None = None  # the load-balancing loss's weight while the router trains
    #                                            (None: the model config's router_aux_loss_coef; 0: off)

    def __post_init__(self):
        object.__setattr__(self, 'keep_activations', parse_keep(self.keep_activations))
        for name in ('micro_batches_per_trip', 'grad_accum'):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise SlowLlamaError(f'{name} must be at least 1, got {value!r}')
        coef = self.router_aux_loss_coef
        if coef is not None and (not isinstance(coef, (int, float)) or isinstance(coef, bool) or not coef >= 0):
            raise SlowLlamaError(f'router_aux_loss_coef must be a number >= 0, got {coef!r}')

    @property
    def step_shape(self):
        """(micro-batches, rows, positions, packed) of the step the run declared."""
        return self.grad_accum, self.step_rows or self.batch_hint[0], self.batch_hint[1], self.packed


def parse_keep(keep):
    """keep_activations: 'auto', 'all', 'none' or a number of blocks (the last ones)."""
    if keep in KEEP_MODES:
        return keep
    try:
        blocks = int(keep)
    except (TypeError, ValueError):
        blocks = -1
    if blocks < 0:
        raise SlowLlamaError(f'keep_activations: {keep!r} is not auto, all, none or a number of blocks')
    return blocks
