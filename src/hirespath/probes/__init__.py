"""Scikit-learn-style probes on embedding arrays (``fit(x, y, val=None, trainer=None)``, ``predict_proba(x)``):
the KNN classifier and the linear probe with its solvers, built by ``conf/head/{knn,linear_probe}.yaml``.
``nn.Module`` heads (MIL, Mask2Former) live in ``hirespath.heads``."""
