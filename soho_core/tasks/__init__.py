"""Downstream tasks: VQA v2, NLVR2, image-text retrieval and visual entailment (SNLI-VE)."""
