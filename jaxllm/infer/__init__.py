"""Using a trained run: ``jaxllm.load`` (a jaxllm run or a Hugging Face directory) and the generate command."""
