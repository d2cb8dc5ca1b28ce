"""The authorize step of the call path: one pipeline (pipeline.py), one module per rule kind."""
