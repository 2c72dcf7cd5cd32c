"""The pass types, shared by the passes (which build them) and the pipeline and artifact code (which
run and record them): PassInfo (a registry entry), PassResult (what a pass returns) and
PassRecord (a pass in a pipeline). mllmc.passes re-exports them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mllmc.runtime.manifest import AppliedPass


@dataclass(frozen=True)
class PassResult:
    segments: Any  # mllmc.compiler.core.capture.Segments, rewritten
    stats: dict[str, Any]


@dataclass(frozen=True)
class PassInfo:
    name: str
    fn: Callable[[Any, Any], PassResult]
    config_cls: type
    summary: str
    stage: str  # "pre_llm" | "in_llm"
    prepare: Callable[[Any, Any, Any], Any] | None = None
    # (cfg, ModelShape) -> None: UserError for options the model's config.json already rules
    # out, run before the model loads (values the config leaves unstated are None: skip them)
    check: Callable[[Any, Any], None] | None = None
    reference: Callable[[Any, Any, Any], Any] | None = None
    prunes: bool = False


@dataclass(frozen=True)
class PassRecord:
    """A pass in a pipeline: its registry entry, its resolved config, and (once it ran) what it
    did, as the manifest stores it."""

    info: PassInfo
    config: Any
    applied: AppliedPass | None = None

    @property
    def name(self) -> str:
        return self.info.name

    def reference(self, model: Any, info: Any) -> Any:
        """The pass's eager reference as a context manager (a no-op for passes without one)."""
        import contextlib

        if self.info.reference is None:
            return contextlib.nullcontext()
        return self.info.reference(model, info, self.config)
