"""Early exiting: confidence measures and exit thresholds.

Convention: higher confidence = more confident; a token exits iff
``confidence >= threshold`` (``threshold = +inf`` never exits).
"""
from recursive_lm.early_exit.confidence import (
    CONFIDENCE_MEASURES,
    MetaClassifier,
    consistency_labels,
    entropy_confidence,
    get_confidence_fn,
    hidden_cosine,
    kl_confidence,
    kl_divergence,
    logit_adjusted_ce,
    meta_confidence,
    softmax_margin,
    softmax_margin_approx,
    softmax_max,
    train_meta_classifier,
)
from recursive_lm.early_exit.thresholds import (
    BetaMixtureConfig,
    BetaMixtureState,
    LTTResult,
    bentkus_pvalue,
    bernoulli_kl,
    beta_log_pdf,
    beta_mixture_init,
    beta_mixture_threshold,
    beta_mixture_update,
    binom_cdf,
    consistent_posterior,
    decaying_threshold,
    fixed_sequence_test,
    fixed_threshold,
    hoeffding_bentkus_pvalue,
    hoeffding_pvalue,
    ltt_calibrate,
    should_exit,
    token_inconsistency_losses,
)
