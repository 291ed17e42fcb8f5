"""The Colab notebook: up to date with its generator, and it runs in a real
Jupyter kernel (nbclient + ipykernel, the ``test`` extra).

The slow test executes the whole notebook with tiny settings from the
``RLM_NOTEBOOK_*`` variables; the fast one runs only its install cell (which,
inside this checkout, installs nothing) in a kernel.
"""
import importlib.util
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NB = os.path.join(ROOT, "experiments", "colab", "uptrain_smollm2.ipynb")
GEN = os.path.join(ROOT, "experiments", "colab", "make_notebook.py")
MARK = "RLM_NOTEBOOK_RESULT "


def _generator():
  spec = importlib.util.spec_from_file_location("make_notebook", GEN)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def _code_cells():
  with open(NB, encoding="utf-8") as f:
    nb = json.load(f)
  return [("".join(c["source"]), c["id"]) for c in nb["cells"]
          if c["cell_type"] == "code"]


def test_notebook_matches_generator():
  with open(NB, encoding="utf-8") as f:
    text = f.read()
  gen = _generator()
  assert text == gen.render(), \
      "run python experiments/colab/make_notebook.py to regenerate the notebook"
  nb = json.loads(text)
  assert nb["nbformat"] == 4 and nb["metadata"]["kernelspec"]["language"] == "python"
  for c in nb["cells"]:
    if c["cell_type"] == "code":
      assert c["outputs"] == [] and c["execution_count"] is None
      compile("".join(c["source"]), c["id"], "exec")  # valid Python, no magics
  first_md = "".join(nb["cells"][0]["source"])
  assert "colab.research.google.com/assets/colab-badge.svg" in first_md
  assert f"colab.research.google.com/github/{gen.GITHUB_REPO}/blob/main/" \
         "experiments/colab/uptrain_smollm2.ipynb" in first_md
  install = _code_cells()[0][0]
  assert f'REPO_URL = "{gen.REPO_URL}"' in install and "pip" in install
  assert "RLM_REPO_URL" in install and "find_checkout" in install
  src = "\n".join(s for s, _ in _code_cells())
  assert "RLM_NOTEBOOK_STEPS" in src and "trainer.train(config)" in src
  assert "describe(" in src and "flax" not in src  # library calls only, no model code


def _kernel_env(monkeypatch, **settings):
  # tests/conftest.py gives this process 8 fake CPU devices, over which the
  # trainer would replicate teacher, student and optimizer state 8 times. The
  # kernel (a child process) gets one CPU device.
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  monkeypatch.setenv("RLM_NOTEBOOK_NO_INSTALL", "1")  # never pip install in CI
  monkeypatch.setenv("RLM_REPO", ROOT)
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("MPLBACKEND", "Agg")
  for k, v in settings.items():
    monkeypatch.setenv(k, v)


def _execute(cells, timeout, extra=()):
  """Runs ``cells`` (the notebook file's first N code cells, or all with None)
  plus ``extra`` code in one kernel; returns the text printed."""
  import nbformat  # pylint: disable=g-import-not-at-top
  from nbclient import NotebookClient  # pylint: disable=g-import-not-at-top
  nb = nbformat.read(NB, as_version=4)
  code = [c for c in nb.cells if c.cell_type == "code"]
  keep = code if cells is None else code[:cells]
  nb.cells = [c for c in nb.cells if c.cell_type != "code" or c in keep]
  nb.cells += [nbformat.v4.new_code_cell(e) for e in extra]
  NotebookClient(nb, timeout=timeout, kernel_name="python3",
                 resources={"metadata": {"path": ROOT}}).execute()
  out = []
  for c in nb.cells:
    for o in c.get("outputs", []):
      if o.get("output_type") == "stream":
        out.append(o["text"])
  return "".join(out)


def test_install_cell_runs_in_a_kernel(monkeypatch):
  pytest.importorskip("nbclient")
  pytest.importorskip("ipykernel")
  _kernel_env(monkeypatch)
  text = _execute(1, timeout=120, extra=[
      f"import json\nprint({MARK!r} + json.dumps(REPO))"])
  assert f"recursive_lm {__import__('recursive_lm').__version__} from " in text
  assert os.path.join(ROOT, "recursive_lm") in text
  repo = json.loads(text.split(MARK, 1)[1].splitlines()[0])
  assert repo == ROOT


@pytest.mark.slow
def test_notebook_executes(monkeypatch, tmp_path):
  pytest.importorskip("nbclient")
  workdir = tmp_path / "nb_run"
  # One BLAS thread: numpy's SVD (LoRA init) with 2 OpenBLAS threads on busy
  # shared cores was measured 20x slower (7.8 s vs 0.4 s per 576x1536 matrix).
  _kernel_env(monkeypatch, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1",
              **{f"RLM_NOTEBOOK_{k}": v for k, v in {
                  "STEPS": "2", "SEQ_LEN": "64", "BATCH": "2", "EVAL_BATCHES": "1",
                  "TASK_LIMIT": "1", "K_SHOT": "0", "MAX_NEW": "4",
                  "WORKDIR": str(workdir)}.items()})
  report = f"""
import json
s = summary
print({MARK!r} + json.dumps({{
    "summary": {{k: s.get(k) for k in ("status", "final_step", "teacher_ppl",
                                      "student_ppl_init", "student_ppl_final")}},
    "scores": scores, "texts": texts, "prompts": PROMPTS}}))
"""
  text = _execute(None, timeout=900, extra=[report])
  res = json.loads(text.split(MARK, 1)[1].splitlines()[0])
  s, scores = res["summary"], res["scores"]
  assert s["status"] == "completed" and s["final_step"] == 2
  assert list(scores) == ["teacher", "student at init", "student uptrained"]
  assert set(scores["teacher"]) == {"ppl", "capitals", "python_facts"}
  # The notebook scores the same held-out batches as the trainer.
  assert scores["teacher"]["ppl"] == pytest.approx(s["teacher_ppl"], rel=1e-3)
  assert scores["student at init"]["ppl"] == pytest.approx(s["student_ppl_init"],
                                                           rel=1e-3)
  assert scores["student uptrained"]["ppl"] == pytest.approx(s["student_ppl_final"],
                                                             rel=1e-3)
  assert (workdir / "notebook_curves.png").stat().st_size > 1000
  assert len(res["texts"]) == len(res["prompts"])
  assert "describe" in text or "unique params" in text
