"""ml-offload: a local LLM server on llama.cpp and its Neovim plugin."""

__version__ = "0.1.0"
