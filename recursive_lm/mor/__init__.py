"""Mixture-of-Recursions (Bae et al. 2025) on the depth-plan model.

* :mod:`routers` - router parameters (leading loops axis), gates, update rule.
* :mod:`block` - the routed shared block: gathered top-k and dense-masked paths,
  KV strategies (recursion-wise, recursive sharing, hybrid), cache validity.
* :mod:`losses` - auxiliary BCE, aux-router BCE, z-loss, balancing loss,
  loss-free bias update, router metrics.
* :mod:`flops` - the paper's FLOP accounting; :mod:`presets` - paper shapes.
* :mod:`decode` - causal MoR generation and threshold calibration.
* :mod:`convert` - add a fresh router to a converted pretrained student
  (MoR uptraining via ``training.trainer``, ``config.convert.router``).

Configure with ``ModelConfig(router=RouterConfig(...))``; the model class is
the one ``recursive_lm.nn.model.Transformer``.
"""
