"""pricelevel: the pure library behind the pipeline (no Prefect imports here).

Flows (``flows/``) and tasks (``tasks/``) wire these functions together; everything here takes data and
returns data, with I/O confined to the edges (candle sources, the store, brokers).
"""

__version__ = "0.1.0"
