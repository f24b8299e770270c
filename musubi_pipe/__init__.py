"""musubi_pipe: declarative, hash-addressed LoRA training pipelines for video/image diffusion transformers.

Importing this package stays cheap: torch, diffusers and transformers are imported only inside the
stages and model adapters that use them.
"""

__version__ = "0.1.0"
