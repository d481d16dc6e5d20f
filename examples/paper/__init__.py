"""The parts of ``python -m examples.reproduce``, one role each: ``data`` (the data sets), ``grid`` (the models of
the sweep), ``training`` (how a model trains and when it stops), ``measures`` (how a trained model is measured),
``runner`` (one model's job, and the sweep in processes or on Ray), ``manifold`` (F2's experiment along ellipses),
``analysis`` and ``rank_statistics`` (the statistics of every finding), ``verdicts`` (every verdict rule),
``report`` and ``figures`` (the report, one function per section)."""
