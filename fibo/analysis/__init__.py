"""``fibo-analyze``: why a trained model does what it does (issue 10, item 3).

Modules: :mod:`~fibo.analysis.cka` (linear CKA), :mod:`~fibo.analysis.hooks` (head outputs,
head ablation, attention probabilities of fibo's Attention modules), :mod:`~fibo.analysis.stats`
(attention distance and entropy), :mod:`~fibo.analysis.corruptions` (ImageNet-C corruptions),
:mod:`~fibo.analysis.measure` (the measurements), :mod:`~fibo.analysis.figures` (PNGs),
:mod:`~fibo.analysis.loading` (checkpoint -> run config, data, model), :mod:`~fibo.analysis.target`
(the MLflow run), :mod:`~fibo.analysis.analyze` (all of it) and :mod:`~fibo.analysis.cli`.
"""
