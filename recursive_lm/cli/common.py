"""Flags and checks shared by several subcommands (model, sampling, files)."""
from __future__ import annotations

import os

from absl import flags

from recursive_lm.cli.core import UserError, log, validator, Timer


def define_model(fv: flags.FlagValues, default: str = "smollm2-135m", help_extra: str = ""):
  flags.DEFINE_string("model", default,
                      "Preset name (smollm2-135m), .gguf file, Hugging Face folder, folder "
                      "saved by recursive_lm, or a training run folder (its final/ model)."
                      + help_extra, flag_values=fv)


def check_model(spec: str) -> str | None:
  """Resolves --model without loading it (run folder -> final/); UserError if bad."""
  from recursive_lm import api  # pylint: disable=g-import-not-at-top
  from recursive_lm.checkpoints.hf_folder import CheckpointError  # pylint: disable=g-import-not-at-top
  try:
    return api.resolve_model_path(spec)
  except CheckpointError as e:
    raise UserError(f"--model: {e}") from e


def load_model(spec: str):
  from recursive_lm import api  # pylint: disable=g-import-not-at-top
  path = check_model(spec)
  t = Timer()
  m = api.load(path)
  log(f"loaded {m.cfg.name} from {m.source} ({t():.1f}s; plan {m.cfg.plan})")
  return m


def read_text_file(flag: str, path: str) -> str:
  path = os.path.expanduser(path)
  if not os.path.exists(path):
    raise UserError(f"--{flag} {path!r} not found; pass an existing UTF-8 text file")
  if os.path.isdir(path):
    raise UserError(f"--{flag} {path!r} is a folder; pass a UTF-8 text file")
  try:
    with open(path, encoding="utf-8") as f:
      return f.read()
  except UnicodeDecodeError as e:
    raise UserError(f"--{flag} {path!r} is not UTF-8 text ({e.reason} at byte {e.start}); "
                    "pass a UTF-8 text file") from e
  except OSError as e:
    raise UserError(f"cannot read --{flag} {path!r}: {e.strerror}") from e


def check_out_folder(flag: str, path: str, overwrite: bool) -> str:
  path = os.path.expanduser(path)
  if os.path.isfile(path):
    raise UserError(f"--{flag} {path!r} is a file; pass a folder to write the model into")
  if os.path.isdir(path) and os.listdir(path) and not overwrite:
    raise UserError(f"--{flag} {path!r} exists and is not empty; pick a new folder or "
                    "pass --overwrite")
  return path


def define_sampling(fv: flags.FlagValues):
  flags.DEFINE_bool("greedy", True, "Greedy decoding (--nogreedy samples).", flag_values=fv)
  flags.DEFINE_float("temperature", 1.0, "Sampling temperature (> 0).", flag_values=fv)
  flags.DEFINE_integer("top_k", 0, "Top-k sampling (0 = off).", flag_values=fv)
  flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass in (0, 1] (1.0 = off).",
                     flag_values=fv)
  flags.DEFINE_integer("seed", 0, "Sampling seed.", flag_values=fv)
  validator(fv, "temperature", lambda v: v > 0,
            "--temperature must be > 0; use --greedy for argmax decoding")
  validator(fv, "top_k", lambda v: v >= 0, "--top_k must be >= 0 (0 turns it off)")
  validator(fv, "top_p", lambda v: 0 < v <= 1,
            "--top_p must be in (0, 1], e.g. --top_p 0.9 (1.0 turns it off)")


def sampling_config(fv):
  from recursive_lm.decode.sampling import SamplingConfig  # pylint: disable=g-import-not-at-top
  return SamplingConfig(greedy=fv.greedy, temperature=fv.temperature, top_k=fv.top_k,
                        top_p=fv.top_p)


def define_decoder(fv: flags.FlagValues):
  """Weight format, early-exit and self-speculative options (decode.early_exit / speculative)."""
  flags.DEFINE_enum("weights", "auto", ["auto", "f32", "bf16", "int8"],
                    "Decode weight format (docs/weight_formats.md): 'auto' is bf16 where the "
                    "native CPU panel kernel runs (held-out perplexity +0.09% of f32), else "
                    "f32; int8 needs the native kernel.", flag_values=fv)
  flags.DEFINE_enum("early_exit", "none", ["none", "free", "calm"],
                    "Early-exit decoding (EarlyExitEngine): 'free' (one shallow exit, "
                    "deferred deep pass) or 'calm' (per-token exits).", flag_values=fv)
  flags.DEFINE_string("threshold", "0.9",
                      "Early exit: confidence threshold in (0, 1], or 'adaptive' (free "
                      "only: Beta-mixture calibration).", flag_values=fv)
  flags.DEFINE_enum("confidence", "softmax_diff",
                    ["softmax_diff", "softmax_max", "entropy", "state", "kl"],
                    "Early exit: confidence measure (state and kl: calm only).",
                    flag_values=fv)
  flags.DEFINE_list("exits", None, "Early exit: exits as unrolled layer counts, e.g. "
                    "15 (free) or 8,16,24 (calm); default: after each loop.", flag_values=fv)
  flags.DEFINE_enum("schedule", "fixed", ["fixed", "decaying"],
                    "Early exit (calm): fixed or CALM's decaying threshold.", flag_values=fv)
  flags.DEFINE_bool("speculative", False, "Lossless self-speculative decoding: with "
                    "--draft_layers/--draft_loops, draft with the first layers "
                    "(SelfSpeculativeEngine); without them, draft with a trained exit "
                    "module (--exit_artifact; default: the one shipped for SmolLM2-135M; "
                    "greedy only).",
                    flag_values=fv)
  flags.DEFINE_string("exit_artifact", None, "Speculative / early exit: exit-module artifact "
                      "folder (recursive_lm.exits; default: the shipped SmolLM2 artifact; "
                      "--early_exit on a vanilla model exits through its modules).",
                      flag_values=fv)
  flags.DEFINE_integer("draft_layers", None, "Speculative: draft depth in unrolled layers.",
                       flag_values=fv)
  flags.DEFINE_integer("draft_loops", None, "Speculative: draft with this many loops of the "
                       "shared block (recursive models).", flag_values=fv)
  flags.DEFINE_integer("draft_len", 4, "Speculative: tokens drafted per round (>= 1).",
                       flag_values=fv)
  validator(fv, "draft_len", lambda v: v >= 1, "--draft_len must be >= 1")
  validator(fv, "draft_layers", lambda v: v >= 1, "--draft_layers must be >= 1")
  validator(fv, "draft_loops", lambda v: v >= 1, "--draft_loops must be >= 1")
  validator(fv, "threshold", _threshold_ok,
            "--threshold must be a number in (0, 1] or 'adaptive'")
  validator(fv, "exits", lambda v: all(x.strip().isdigit() and int(x) > 0 for x in v),
            "--exits must be positive layer counts separated by commas, e.g. --exits 8,16")
  flags.register_multi_flags_validator(
      ["early_exit", "speculative"], lambda d: not (d["speculative"] and d["early_exit"] != "none"),
      message="--speculative and --early_exit exclude each other; pick one", flag_values=fv)
  flags.register_multi_flags_validator(
      ["speculative", "draft_layers", "draft_loops"],
      lambda d: d["speculative"] or (d["draft_layers"] is None and d["draft_loops"] is None),
      message="--draft_layers/--draft_loops need --speculative", flag_values=fv)
  flags.register_multi_flags_validator(
      ["draft_layers", "draft_loops"],
      lambda d: d["draft_layers"] is None or d["draft_loops"] is None,
      message="pass --draft_layers or --draft_loops, not both", flag_values=fv)
  flags.register_multi_flags_validator(
      ["early_exit", "threshold"],
      lambda d: d["threshold"] != "adaptive" or d["early_exit"] == "free",
      message="--threshold adaptive calibrates FREE's deep passes; use --early_exit free",
      flag_values=fv)


def _threshold_ok(v: str) -> bool:
  if v == "adaptive":
    return True
  try:
    return 0 < float(v) <= 1
  except ValueError:
    return False


def weight_format(fv, model, batch: int) -> str:
  """``--weights``: 'auto' picks bf16 where the engine reads panels natively."""
  if fv.weights != "auto":
    return fv.weights
  return "bf16" if model.decode_layout(batch)[0] == "panel" else "f32"


def decoder_engine(fv, model, batch: int):
  """The engine the decoder flags ask for (cached on the model)."""
  weights = weight_format(fv, model, batch)
  if fv.speculative and fv.draft_layers is None and fv.draft_loops is None:
    if not getattr(fv, "greedy", True):
      raise UserError("--speculative without --draft_layers/--draft_loops drafts with a "
                      "trained exit module and is greedy only; drop --nogreedy or pass "
                      "--draft_layers N")
    return model.exit_speculative_engine(batch, weights=weights, artifact=fv.exit_artifact)
  if fv.speculative:
    return model.speculative_engine(batch, draft_layers=fv.draft_layers,
                                    draft_loops=fv.draft_loops, draft_len=fv.draft_len,
                                    weights=weights)
  if fv.early_exit != "none" and (fv.exit_artifact or model.cfg.plan.loops < 2):
    # A vanilla model (e.g. the embedded SmolLM2) has no loop exits: exit through
    # the trained exit modules (head-free meta confidence unless --confidence).
    opts = {"threshold": fv.threshold if fv.threshold == "adaptive" else float(fv.threshold)}
    if fv["confidence"].present:
      opts["confidence"] = fv.confidence
    if fv.exits:
      opts["layers"] = [int(x) for x in fv.exits]
    if fv.early_exit == "calm":
      opts["schedule"] = fv.schedule
    return model.exit_module_engine(batch, fv.early_exit, weights=weights,
                                    artifact=fv.exit_artifact, **opts)
  if fv.early_exit != "none":
    thr = fv.threshold if fv.threshold == "adaptive" else float(fv.threshold)
    opts = dict(policy=fv.early_exit, confidence=fv.confidence, threshold=thr,
                schedule=fv.schedule)
    if fv.exits:
      exits = [int(x) for x in fv.exits]
      # FREE's exits are the shallow exit plus the full depth.
      opts["exits"] = exits
    return model.early_exit_engine(batch, weights=weights, **opts)
  return model.engine(batch, weights=weights)


def decoder_stats(out) -> str:
  """Extra figures of early-exit / speculative outputs."""
  bits = []
  if hasattr(out, "avg_layers"):
    bits.append(f"avg layers {out.avg_layers:.2f}, exit fraction {out.exit_fraction:.2f}")
  if hasattr(out, "acceptance_rate"):
    bits.append(f"acceptance {out.acceptance_rate:.2f}, {out.tokens_per_round:.2f} tokens/round")
  return "; ".join(bits)
