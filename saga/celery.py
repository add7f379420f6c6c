"""The engine on your own Celery app.

.. code-block:: python

    # proj/celery_app.py
    from celery import Celery
    import saga.celery

    app = Celery("proj", broker="redis://redis:6379/0")
    app.config_from_object("proj.celeryconfig")   # your configuration stays yours
    saga.celery.install(app)                      # SAGA_* settings from the environment

Then ``celery -A proj.celery_app worker`` runs your tasks and saga steps, with the checks and
hooks of ``saga worker``; ``saga relay --app proj.celery_app`` publishes through the same app.
"""

from __future__ import annotations

from saga.workers.install import install

__all__ = ["install"]
