"""An offline, scriptable OpenAI-compatible LLM for driving the real `opencode serve` in tests and
the demo. See mockllm.server for the script format; `python -m mockllm --help` runs it."""

from .server import MODEL_ID, MockLLM, load_script, provider_config

__all__ = ["MODEL_ID", "MockLLM", "load_script", "provider_config"]
