"""DermaFlux: synthetic skin-lesion images from dermatological attributes with Flux.1 + LoRA, on Ray."""

__version__ = "0.1.0"
