"""The paper's experiments that are not a training run: the Fig. 3 toy problem (:mod:`.toy`)."""
