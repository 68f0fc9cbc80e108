"""A MoE block's experts as the engine asks the store for them: only once its router has run, and
only those some token chose (model/moe.py calls the fetcher; the store reads each expert alone)."""

EXPERTS = 'mlp.experts'  # a MoE block's experts, named as the prepared block file names them


def fetcher(store, i, names=None):
    """fetch_experts for block i, None for a dense model: (expert ids) -> {e: {name: tensor}}, the
    experts' weights, or with --quant their packed parts (then fetch.unpack makes the weights).
    A kept block's WeightNames (kept.py) is told their names, so its graph keeps them by name, not by
    value, and learns how to fetch the same ones again for the backward."""
    if not store.cfg.n_experts:
        return None

    def fetch(ids):
        experts = store.packed_experts(i, ids)
        if names is not None:
            names.add(flat(experts), again=lambda: again(store, i, names))
        return experts
    if store.quant:  # packed parts: model/moe.py unpacks each expert only while it computes
        fetch.unpack = store.unpack_expert
    return fetch


def again(store, i, names):
    """The experts a kept block's forward used, fetched again for its backward, by name."""
    ids = sorted({int(n.split('.')[2]) for n in names.forward if n.startswith(EXPERTS + '.')})
    return flat(store.packed_experts(i, ids)) if ids else {}


def flat(experts):
    return {f'{EXPERTS}.{e}.{n}': t for e, tensors in experts.items() for n, t in tensors.items()}
