"""deftcompress: compress transformers through composable passes and report what each step cost and bought.

Python API::

    from deftcompress import Recipe, run_recipe
    report = run_recipe(Recipe.build(name="demo", model="minilm", task="glue/sst2",
                                     max_eval_samples=64, passes=[{"evaluate": {}}]))
    print(report.steps[-1].task_score, report.steps[-1].density["encoder"])
"""

from deftcompress.errors import DeftcompressError, RecipeError
from deftcompress.pipeline.recipe import Recipe, load_recipe

__version__ = "0.1.0"
__all__ = ["Recipe", "load_recipe", "run_recipe", "load_model", "Pipeline", "Report", "DeftcompressError", "RecipeError", "__version__"]


def __getattr__(name):
    # Lazy: importing the package for `deftcompress validate` must not pull in torch-heavy modules.
    if name in ("run_recipe", "Pipeline"):
        from deftcompress.pipeline import runner as pipeline

        return getattr(pipeline, name)
    if name == "load_model":  # load_model(folder) -> (model, tokenizer, arch), whatever format the folder holds
        from deftcompress.models.formats import load_model

        return load_model
    if name == "Report":
        from deftcompress.reporting.report import Report

        return Report
    raise AttributeError(name)
