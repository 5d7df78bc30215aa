"""Everything specific to Qwen3-Omni, in one place (being split by job: the whole module is checkpoint.py for now)."""

from core.qwen_omni.checkpoint import *  # noqa: F401,F403
