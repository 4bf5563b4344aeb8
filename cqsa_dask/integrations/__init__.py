"""Bridges from other libraries to the engine (each imports its library only when used).

  transformers   ``attn_implementation="cqsa"`` for Hugging Face models
"""
