"""Development tools that serve the engine but are not part of it: benchmarks, the demo, the
local model and travel servers, the OTLP receiver and the example travel agent.

They live in a clone of the repository, outside the installed package; ``saga bench`` and
``saga demo`` find them there (run from the clone's top folder).
"""
