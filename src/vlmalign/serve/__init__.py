"""An OpenAI-compatible HTTP server (``vlmalign serve``): FastAPI app, request checks and limits,
and one worker thread that owns the model and batches concurrent requests."""

from .limits import ServeLimits

__all__ = ["ServeLimits"]
