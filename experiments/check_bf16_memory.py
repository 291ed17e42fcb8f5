r"""Peak memory of loading a bf16 Hugging Face folder: host upcast vs cast on device.

    python experiments/check_bf16_memory.py            # ~84M params, 168 MB bf16
    python experiments/check_bf16_memory.py --layers 2 --out results/bf16_load_memory

Writes a random bf16 Llama folder to a temp dir, then measures in fresh
subprocesses (peak RSS from ``getrusage``, minus the same process's RSS after
importing jax and recursive_lm):

* ``host_upcast``: ``load_hf_folder(dtype=np.float32)`` (the reader upcasts on
  the host, as before) then ``jax.device_put`` of every tensor;
* ``device_cast``: ``load_hf_folder()`` (bf16 stays bf16 on the host) then
  ``weights_to_device(weights, "float32")`` (bf16 to the device, cast there,
  host copies released tensor by tensor).

On the CPU backend device buffers live in the same RAM, so RSS counts both
sides. Ideal figures: host_upcast holds f32 on the host and on the device
(2 x f32 bytes); device_cast at most the bf16 host copy plus the f32 device
copy (bf16 + f32 bytes), less as host tensors are released.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile

CHILD = r"""
import json, resource, sys
import numpy as np
import jax
from recursive_lm.checkpoints import load_hf_folder, weights_to_device
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
folder, mode = sys.argv[1], sys.argv[2]
if mode == "host_upcast":
  w = load_hf_folder(folder, dtype=np.float32).weights
  dev = {k: jax.device_put(v) for k, v in w.items()}
  del w
else:
  w = load_hf_folder(folder).weights
  dev = weights_to_device(w, "float32")
jax.block_until_ready(dev)
assert {str(x.dtype) for x in dev.values()} == {"float32"}
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"base_kb": base, "peak_kb": peak}))
"""


def write_folder(path: str, layers: int, d: int, ff: int, vocab: int) -> int:
  import ml_dtypes
  import numpy as np
  from safetensors.numpy import save_file
  from recursive_lm.checkpoints import expected_shapes
  from recursive_lm.config import DepthPlan, ModelConfig
  cfg = ModelConfig(vocab_size=vocab, d_model=d, n_heads=d // 64, n_kv_heads=d // 64,
                    d_ff=ff, plan=DepthPlan.vanilla(layers), tie_embeddings=True)
  rng = np.random.default_rng(0)
  w = {k: (0.02 * rng.standard_normal(s, dtype=np.float32)).astype(ml_dtypes.bfloat16)
       for k, s in expected_shapes(cfg).items()}
  os.makedirs(path, exist_ok=True)
  hf = cfg.to_hf_config()
  hf["torch_dtype"] = "bfloat16"
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(hf, f)
  save_file(w, os.path.join(path, "model.safetensors"))
  return int(sum(x.size for x in w.values()))


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--layers", type=int, default=4)
  ap.add_argument("--d_model", type=int, default=1024)
  ap.add_argument("--d_ff", type=int, default=2816)
  ap.add_argument("--vocab", type=int, default=32000)
  ap.add_argument("--out", default="results/bf16_load_memory")
  args = ap.parse_args()
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  rows = {}
  with tempfile.TemporaryDirectory() as tmp:
    n = write_folder(tmp, args.layers, args.d_model, args.d_ff, args.vocab)
    for mode in ("host_upcast", "device_cast"):
      out = subprocess.run([sys.executable, "-c", CHILD, tmp, mode], env=env,
                           check=True, capture_output=True, text=True).stdout
      r = json.loads(out.strip().splitlines()[-1])
      rows[mode] = round((r["peak_kb"] - r["base_kb"]) / 1024, 1)
  mb_bf16, mb_f32 = n * 2 / 2**20, n * 4 / 2**20
  result = {
      "command": "python experiments/check_bf16_memory.py " + " ".join(sys.argv[1:]),
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "params": n, "bf16_mb": round(mb_bf16, 1), "f32_mb": round(mb_f32, 1),
      "peak_over_base_mb": rows,
      "ideal_mb": {"host_upcast": round(2 * mb_f32, 1),
                   "device_cast": round(mb_bf16 + mb_f32, 1)},
  }
  md = [f"# Peak memory of loading a bf16 HF folder ({n / 1e6:.1f}M params)", "",
        f"`{result['command']}` ({result['date']}); bf16 {mb_bf16:.0f} MB, f32 "
        f"{mb_f32:.0f} MB. Peak RSS over the process's RSS after imports (CPU "
        "backend: device buffers are in the same RAM).", "",
        "| path | peak over base (MB) | ideal bound (MB) | peak / f32 bytes |",
        "|---|---:|---:|---:|"]
  for mode, label in (("host_upcast", "upcast on host, then device_put"),
                      ("device_cast", "bf16 to device, cast there")):
    md.append(f"| {label} | {rows[mode]:.0f} | {result['ideal_mb'][mode]:.0f} | "
              f"{rows[mode] / mb_f32:.2f} |")
  text = "\n".join(md) + "\n"
  print(text)
  os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
  with open(args.out + ".json", "w") as f:
    json.dump(result, f, indent=2)
  with open(args.out + ".md", "w") as f:
    f.write(text)


if __name__ == "__main__":
  main()
