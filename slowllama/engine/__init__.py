"""The streamed model: the step's schedule, the forward block by block, the manual backward, the
sliced head, saved inputs, devices and RNG."""
