"""Examples that run on the engine; importable by workers by path (``examples.travel_agent``)."""
