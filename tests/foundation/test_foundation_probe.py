"""probe_scores(tol=): the probe fitted to convergence scores as a tightly converged reference does."""
from __future__ import annotations

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score
from sklearn.preprocessing import StandardScaler

from xscale.eval.metrics import probe_scores


def _data(seed: int = 0):
    """Correlated, overlapping classes in 200 dimensions (an ill-conditioned probe, like K·D latents)."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(900, 20))
    X = base @ rng.normal(size=(20, 200)) + 0.3 * rng.normal(size=(900, 200))
    y = np.array(["a", "b", "c", "d"])[(base[:, 0] + 0.8 * base[:, 1] + 0.5 * rng.normal(size=900) > 0).astype(int)
                                       + 2 * (base[:, 2] > 0.3)]
    return X[:600], y[:600], X[600:], y[600:]


def test_converged_probe_equals_a_tight_reference():
    Xtr, ytr, Xte, yte = _data()
    sc = StandardScaler().fit(Xtr)
    ref = LogisticRegression(max_iter=100_000, tol=1e-10, random_state=0).fit(sc.transform(Xtr), ytr)
    want = f1_score(yte, ref.predict(sc.transform(Xte)), average="macro")
    got = probe_scores(Xtr, ytr, Xte, yte, tol=1e-6, max_iter=20_000)["macro_f1"]
    assert got == want
    loose = LogisticRegression(max_iter=2000, random_state=0).fit(sc.transform(Xtr), ytr)
    assert loose.n_iter_[0] < ref.n_iter_[0]  # the default tolerance stops earlier: tol reaches the solver
    assert probe_scores(Xtr, ytr, Xte, yte)["macro_f1"] == f1_score(yte, loose.predict(sc.transform(Xte)),
                                                                     average="macro")
