"""Captioning: lesion attributes measured from the image, and caption writers (template, llm)."""

from dermaflux.caption.template import LesionAttributes, caption_from_attributes

__all__ = ["LesionAttributes", "caption_from_attributes"]
