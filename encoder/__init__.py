"""Qwen3-Omni's audio tower as an Audio Encoder Challenge (XARES-LLM) encoder, and linear probes on it."""
