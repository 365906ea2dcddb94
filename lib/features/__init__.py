"""The features stage: the feature catalogue, feature columns, labels, per-symbol feature tables and the
look-ahead check."""
