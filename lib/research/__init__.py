"""Research on the whole pipeline: the retrain-promote-trade loop replayed over history (:mod:`.rolling`)."""
