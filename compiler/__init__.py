"""mllmc compiler: capture (HF LLaVA -> torch.export segments), passes, backends, artifacts.

    from mllmc.compiler.pipeline import compile_model
    compile_model("models/tiny-llava", "out/tiny-shortv", passes=["shortv:ratio=0.6"])

Submodules are imported on use: `import mllmc.compiler` stays cheap (no torch), so the CLI's
`--help` and its error paths answer at once.
"""
