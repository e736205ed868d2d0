"""The small contracts inside serving: what an engine does, what crosses from ingress to engine.

    HTTP ──▶ openai_routes (auth, parse, resolve `model`) ──Backend──▶ LLMServerCore ──Engine──▶ vLLM
                                                                        (adapter residency)

`Engine` is implemented by `vllm_engine.VLLMEngine` (and, in unit tests, by a visibly named
FakeEngine). Requests and responses are vLLM's own OpenAI protocol types; engines set no HTTP
status: they return a response or raise `ServeError`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, AsyncIterator, Literal, Protocol

Kind = Literal["completion", "chat"]


@dataclass(frozen=True)
class AdapterSpec:
    """One concrete adapter the engine can load, as the ingress resolved it for a request.

    `name` is what responses call it: `name@vN` for a registry version (immutable), the plain
    name for a folder loaded by path. `generation` grows each time a folder is (re)loaded under
    the same name, so the engine can tell new weights from old ones that are still in flight.
    """

    name: str
    source: str  # local folder or fsspec URL of the PEFT files
    generation: int = 0
    registry_root: str | None = None  # set for registry versions: fetched (checksums verified) from there

    @property
    def key(self) -> tuple[str, int, str]:
        return (self.name, self.generation, self.source)


class Engine(Protocol):
    """An inference engine serving one base model and LoRA adapters registered by name."""

    model_name: str  # the base model's served name
    max_model_len: int

    async def start(self) -> None: ...

    async def completion(self, request: Any) -> Any:
        """`request.model` names the base or a registered adapter. Returns a CompletionResponse, or
        for `stream=True` an async iterator of SSE strings ("data: {...}\\n\\n", ending with
        "data: [DONE]\\n\\n"). Raises ServeError for anything the client got wrong."""

    async def chat(self, request: Any) -> Any:
        """Like `completion`, for a ChatCompletionRequest."""

    async def add_lora(self, name: str, lora_id: int, path: str) -> None:
        """Load an adapter folder and register it under `name`; raises ServeError(400) if it cannot load."""

    async def remove_lora(self, name: str, lora_id: int) -> None: ...

    async def check_health(self) -> None: ...

    async def shutdown(self) -> None: ...


class Backend(Protocol):
    """What the HTTP layer calls: a local LLMServerCore in tests, a Ray Serve handle in the app."""

    def generate(self, kind: Kind, request: Any, spec: AdapterSpec | None) -> AsyncIterator[Any]:
        """Yields one dict first: `{"status": 200|4xx|5xx, "body": {...}}` for a whole response or an
        error, or `{"status": 200, "stream": True}` followed by SSE strings; streams end with a
        `{"usage": {...}}` dict the HTTP layer keeps for metrics and does not forward."""

    async def load(self, spec: AdapterSpec) -> None: ...

    async def unload(self, name: str) -> None: ...

    async def check_health(self) -> None: ...
