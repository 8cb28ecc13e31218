"""Ollama's API (``/api/chat``, ``/api/generate``, ``/api/tags``, ...) on top of the backends.

Requests are translated into the OpenAI-shaped requests every backend takes, and their
answers back into Ollama's shapes, so the same code serves in-process llama.cpp and
llama-server alike. ``errors`` decides which paths answer Ollama's error shape.
"""
