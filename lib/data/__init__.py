"""The data stage: the candle store and its catalogue of paths, candle sources, incremental ingest,
validation, publishing and store status."""
