"""Run the pipeline from Python, without YAML: evaluate the embedded MiniLM on SST-2.

    DEFTCOMPRESS_DATA_DIR=../shared/data python examples/evaluate_minilm.py --rows 64

Builds a recipe in code, runs it, and reads the report object that comes back.
"""

import argparse

from deftcompress import Recipe, run_recipe

parser = argparse.ArgumentParser()
parser.add_argument("--rows", type=int, default=None, help="evaluate on the first N dev rows (default: all)")
parser.add_argument("--output-dir", default="runs/example_evaluate")
args = parser.parse_args()

recipe = Recipe.build(
    name="example_evaluate",
    model="minilm",
    task="glue/sst2",
    max_eval_samples=args.rows,
    passes=[{"evaluate": {"density_mode": "paper"}}],
)
report = run_recipe(recipe, output_dir=args.output_dir, quiet=True)

for step in report.steps:
    d = step.density
    print(f"{step.pass_name:>9}: {step.task_metric}={step.task_score:.3f}  density={d['encoder']:.4f} ({d['mode']})  "
          f"|a|>{d['tau']}: {d['encoder_above_tau']:.4f}")
print("per layer (masked):", [round(l["density"], 4) for l in report.steps[0].density["per_layer"]])
