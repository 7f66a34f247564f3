"""Fine-tuning: instruction data, loss masking, packing, LoRA / prompt tuning / adapters on a jaxllm
or Hugging Face base."""
