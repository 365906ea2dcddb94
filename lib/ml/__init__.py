"""The ML stage: windowed datasets, the model spec, the multi-symbol LSTM, fitting, Optuna tuning and
evaluation."""
