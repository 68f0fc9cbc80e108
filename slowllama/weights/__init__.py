"""Where frozen weights live: the prepared folder and its formats, the store and its tiers (disk,
pinned RAM, device), the copier, the memory planner."""
