"""One module per task, each holding its ``run_<task>(cfg)``: what the ``hirespath`` CLI and ``tasks/*.py`` call."""
