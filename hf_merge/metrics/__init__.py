"""Local ``evaluate`` metric modules (one folder per metric, ``<name>/<name>.py``), loadable offline with
``evaluate.load(hf_merge.evaluation.metric_path("<name>"))``. They compute with :mod:`hf_merge.evaluation`."""
