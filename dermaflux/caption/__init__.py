"""Captioning: lesion attributes measured from each image (extract), caption writers (template, llm), the Ray Data pipeline."""
