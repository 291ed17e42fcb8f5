"""Mixture-of-Recursions (Bae et al. 2025) on the depth-plan model.

* ``nn.mor_routers`` (re-exported as :mod:`routers`) - router parameters
  (leading loops axis), gates, update rule.
* ``nn.mor_block`` (re-exported as :mod:`block`) - the routed shared block:
  gathered top-k and dense-masked paths, KV strategies (recursion-wise,
  recursive sharing, hybrid), cache validity (``nn.cache.KVCache.valid``).
  Both live in ``nn`` because ``nn.model.Transformer`` builds them.
* :mod:`losses` - auxiliary BCE, aux-router BCE, z-loss, balancing loss,
  loss-free bias update, router metrics.
* :mod:`flops` - the paper's FLOP accounting; :mod:`presets` - paper shapes.
* :mod:`decode` - causal MoR generation and threshold calibration.
* :mod:`convert` - add a fresh router to a converted pretrained student
  (MoR uptraining via ``training.trainer``, ``config.convert.router``).
* :mod:`depthwise` - loop-wise (continuous depth-wise) MoR serving.

The MoR train/eval steps are ``training.mor_step`` (training imports mor,
never the reverse).

Configure with ``ModelConfig(router=RouterConfig(...))``; the model class is
the one ``recursive_lm.nn.model.Transformer``.
"""
