"""Load tests for the CHIAR-Former server: locustfile, headless runner, server process helpers."""
