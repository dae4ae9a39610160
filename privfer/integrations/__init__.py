"""Adapters that carry privfer's secure aggregation over other FL frameworks.

- :mod:`privfer.integrations.flower` — a Flower client mod and a server-side
  ``Grid`` wrapper (``pip install "privfer[flower]"``).

Other frameworks use the message-level API of :mod:`privfer.secagg` directly:
``SecAggClient`` / ``SecAggServer``, one method per stage, messages as bytes
(docs/integrations.md).
"""
