"""The math of the Llama family: the block, LoRA, quantization codes and kernels. Nothing here
knows about files or streaming."""
