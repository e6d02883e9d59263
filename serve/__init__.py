"""`lorafit serve`: one base model, many adapters, an OpenAI-compatible HTTP API (app.py),
adapters by name (adapters.py), OpenAI's shapes (protocol.py). No framework imports here:
generation is core/engine.py's."""
