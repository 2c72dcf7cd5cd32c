"""The compiler core: HF model -> torch.export segments (capture, model_dir), the graph locator,
segment IO and FLOP counts, and the pass types. Imports only mllmc.runtime."""
