"""Configuration of tracking and the registry: where MLflow keeps runs and models, when a challenger wins."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from pricelevel.core.config import Frozen


class TrackingConfig(Frozen):
    """MLflow. Relative paths in the URIs are relative to the project folder."""

    #: A local store (``sqlite:///...``) or a tracking server (``http://host:5000``) shared by every machine.
    tracking_uri: str = "sqlite:///mlruns/mlflow.db"
    #: Where new experiments keep their artifacts (a path or URI). With a tracking server a local path is not
    #: used: the server stores and serves them (``mlflow server --artifacts-destination``).
    artifact_location: str = "mlruns/artifacts"
    #: MLflow experiment of the training runs (each Optuna trial is a nested run).
    experiment: str = "pricelevel"
    #: Registered model name: new versions get ``@challenger``, the promotion flow moves ``@champion``.
    registered_model: str = "pricelevel"


class PromotionConfig(Frozen):
    """When the challenger replaces the champion (rule in docs/concepts/promotion.md "Promotion")."""

    #: The newest out-of-sample window both models are scored on: the last ``window_days`` of data.
    window_days: float = Field(90.0, gt=0)
    #: Tuned metric: challenger must beat the champion by more than this.
    min_improvement: float = Field(0.0, ge=0)
    #: The strategy metric (``selection.metric``) on the same window may be worse than the champion's by at most this.
    backtest_tolerance: float = Field(0.0, ge=0)
    #: Strategy baselines every champion, the first included, must beat on the window (``selection.metric``):
    #: ``volatility`` is the no-model control that ranks bars by ATR/close (a model must add direction to it).
    #: ``gbm`` (not a default) asks the LSTM to beat the LightGBM baseline of its own training run (docs/concepts/promotion.md "Promotion").
    hurdle: tuple[Literal["cash", "level_rule", "volatility", "buy_and_hold", "gbm"], ...] = ("cash", "level_rule", "volatility")
    #: The champion is judged against the same hurdle at every promotion run; after this many failures in a row
    #: it is retired (``@champion`` removed: no new entries until a model earns it). 0: never retired.
    retire_after: int = Field(2, ge=0)
    #: The challenger's deflated Sharpe ratio (its training run's chosen strategy on validation, after every
    #: configuration the run tried: trials x rule candidates) must be at least this; 0 turns the condition off.
    min_deflated_sharpe: float = Field(0.9, ge=0, le=1)
