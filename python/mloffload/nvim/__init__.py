"""The Neovim plugin's implementation; ``rplugin/python3/ml_offload.py`` is its thin entry.

Imports only the standard library, ``pynvim`` and ``httpx`` (through ``mloffload.nvim.client``);
the in-process fallback (llama.cpp) is imported the first time it is needed.
"""
