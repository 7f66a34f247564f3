"""The deep residual transformer: GPT-2 and LLaMA blocks, attention kernels, experts, FLOPs,
KV-cache decoding, weight quantization."""
