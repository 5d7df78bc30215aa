"""The shared runtime every stage uses: recipes, the Qwen3-Omni module, audio decoding, benchmark items,
the feature cache, the tiny kit, provenance and the official answer rule. It imports no stage."""
