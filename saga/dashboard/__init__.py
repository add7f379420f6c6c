"""The web dashboard (``saga dashboard``): runs list, run pages, actions, a JSON API.

Server-rendered HTML on the standard library's WSGI server; reads through
``saga.runs_view``, actions through ``SagaClient``. See ``security`` for what guards it.
"""
