"""A MoE block's experts as the engine asks the store for them: only once its router has run, and
only those some token chose (model/moe.py calls the fetcher; the store reads each expert alone)."""

EXPERTS = 'mlp.experts'  # a MoE block's experts, named as the prepared block file names them


def expert_fetcher(store, i, names=None):
    """fetch_experts for block i: (expert ids) -> {e: {weight name: tensor}}; a kept block's
    WeightNames (kept.py) is told their names, so its graph keeps them by name, not by value."""
    def fetch(ids):
        experts = store.experts(i, ids)
        if names is not None:
            names.add(flat(experts))
        return experts
    return fetch


def kept_experts(store, i, names):
    """The experts a kept block's forward used, fetched again for its backward, by name."""
    ids = sorted({int(n.split('.')[2]) for n in names.forward if n.startswith(EXPERTS + '.')})
    return flat(store.experts(i, ids)) if ids else {}


def flat(experts):
    return {f'{EXPERTS}.{e}.{n}': t for e, tensors in experts.items() for n, t in tensors.items()}
