"""fastalign's kernels inside other libraries: ``integrations.trl`` (TRL's trainers, one line) and
``integrations.hf`` (any transformers causal LM). Each is imported on use, so ``import fastalign``
never needs trl or transformers."""
