"""``massmerge serve``: one loaded MASS artifact behind an HTTP API (FastAPI on uvicorn), with dynamic batching,
back-pressure, limits, auth, Prometheus metrics and a graceful shutdown; :mod:`.ray_serve` runs the same
predictor as a Ray Serve deployment. Needs the ``serve`` extra (``pip install 'massmerge[serve]'``)."""

from __future__ import annotations

__all__: list[str] = []
