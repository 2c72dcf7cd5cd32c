"""mllmc compiler: capture (HF LLaVA -> torch.export segments), passes, backends, artifacts.

    from mllmc.compiler.pipeline import compile_model
    compile_model("models/tiny-llava", "out/tiny-shortv", passes=["shortv:ratio=0.6"])

Submodules are imported on use: `import mllmc.compiler` stays cheap (no torch), so the CLI's
`--help` and its error paths answer at once.
"""

import logging as _logging


class _TorchaoNoise(_logging.Filter):
    """Two warnings that transformers' import of torchao (the `torchao` extra) prints into every
    command once it is installed: a "Failed to load" per torchao CUDA extension on a machine
    without them, and torch's deprecation of the enum constants torchao registers. Neither
    concerns mllmc's use of torchao (the CPU int4 weights of `--target aoti --quantize int4`)."""

    def filter(self, record: _logging.LogRecord) -> bool:
        msg = record.getMessage()
        if record.name == "torchao":
            return not msg.startswith("Failed to load")
        return "register_constant() on Enum subclasses" not in msg


for _name in ("torchao", "torch.utils._pytree"):
    _logging.getLogger(_name).addFilter(_TorchaoNoise())
