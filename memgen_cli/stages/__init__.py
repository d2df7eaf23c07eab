"""One module per stage, each with one public entry point. Stages meet only through artifacts."""
