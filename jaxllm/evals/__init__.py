"""lm-evaluation-harness tasks on jaxllm models: the ``LM`` (``lm``), task files and scores (``tasks``),
and evaluation inside a training run (``during_training``)."""
