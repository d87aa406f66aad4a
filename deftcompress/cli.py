"""The `deftcompress` command: a thin layer over the Python API."""

from __future__ import annotations

import json
import os
import signal
import sys
from contextlib import contextmanager
from pathlib import Path

import click

from deftcompress.errors import DeftcompressError


def _fail(exc: DeftcompressError) -> None:
    click.echo(f"error: {exc}", err=True)
    sys.exit(exc.exit_code)


@contextmanager
def _one_line_errors(where, on_interrupt):
    """What `apply` and `compare` print for what stops them: bad input (exit 2) or the machine (exit 1) in one line,
    Ctrl-C (130) or SIGTERM (143) with what was kept. `where()` names the file for an OS error without one;
    `on_interrupt()` says what was kept."""
    try:
        with _sigterm_as_interrupt():
            yield
    except DeftcompressError as exc:
        _fail(exc)
    except OSError as exc:  # disk full, permissions, a name too long: the system's words, one line
        click.echo(f"error: {exc.filename or where()}: {exc.strerror or exc}", err=True)
        sys.exit(1)
    except KeyboardInterrupt as exc:
        code = 143 if isinstance(exc, Terminated) else 130
        click.echo(f"interrupted ({'SIGTERM' if code == 143 else 'Ctrl-C'}){on_interrupt()}", err=True)
        sys.exit(code)


def _quiet_libraries() -> None:
    """Silence library notices a user cannot act on (without importing the libraries: compare may not need them).

    transformers: tokenizer advice, "newly initialised" heads (our report's notes say which head was new);
    bitsandbytes: an optional CPU kernel package it cannot find (the generic kernel is used).
    """
    import logging

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # read when transformers is imported
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    for name in ("transformers", "bitsandbytes", "adapters", "optimum", "datasets"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import warnings

    # peft: merging LoRA into a 4-bit base "may get different generations"; ours is dequantized exactly first
    warnings.filterwarnings("ignore", message="Merge lora module to 4-bit linear")
    if "transformers" in sys.modules:
        sys.modules["transformers"].logging.set_verbosity_error()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="deftcompress")
def main() -> None:
    """Compress transformers with recipes of passes; report score and activation density per step."""


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--output-dir", type=click.Path(path_type=Path), help="Output folder (default runs/<name>).")
@click.option("--data-dir", type=click.Path(), help="Local data folder (overrides the recipe and $DEFTCOMPRESS_DATA_DIR).")
@click.option("--restart", is_flag=True, help="Replace a run of another recipe (or an unfinished one) in the output folder instead of refusing or resuming.")
@click.option("--trust-pickle", is_flag=True, help="Load a checkpoint that has only pickled weights (.bin/.pt), which can run code: only for sources you trust.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars or step log; only the final table.")
def apply(recipe: Path, output_dir: Path | None, data_dir: str | None, restart: bool, trust_pickle: bool,
          quiet: bool) -> None:
    """Apply RECIPE (YAML) to its model and write runs/<name>/ (report.json, report.md, model/).

    Every finished pass is kept in the output folder: after an error, Ctrl-C or a kill, the same
    command resumes after the last finished pass.
    """
    from deftcompress.pipeline.recipe import Recipe

    pipeline = None
    kept = lambda: (f"; finished passes are kept in {pipeline.output_dir}: run the same command to resume"  # noqa: E731
                    if pipeline else "")
    with _one_line_errors(lambda: pipeline.output_dir if pipeline else recipe, kept):
        loaded = Recipe.from_file(recipe, trust_pickle=trust_pickle, data_dir=data_dir)
        _quiet_libraries()
        from deftcompress.pipeline.runner import Pipeline

        pipeline = Pipeline(loaded, output_dir=output_dir, quiet=quiet, restart=restart,
                            log=lambda *a: click.echo(*a, err=True), warn=lambda text: click.echo(text, err=True))
        report = pipeline.run()
    from deftcompress.training import distributed

    if not distributed.is_main_process():  # under torchrun every process returns the report; one table is enough
        return
    if pipeline.reused_finished_run:
        click.echo(f"{pipeline.output_dir}: already finished with this recipe; shown as it is (--restart runs it again)",
                   err=True)
    elif report.resumed_from is not None:
        click.echo(f"resumed at step {report.resumed_from}: earlier steps come from the interrupted run", err=True)
    click.echo(report.text_table())
    deploy = (report.final or {}).get("deploy", {})
    click.echo(f"\noutputs: {pipeline.output_dir}/ (report.json, report.md, density.png, recipe.resolved.yaml, model/"
               f"{', deploy/' if deploy.get('folder') == 'deploy' else ''})")
    if report.deploy_line():
        click.echo(report.deploy_line(str(pipeline.output_dir)))
    if report.budget_outcome_line():
        click.echo(report.budget_outcome_line())


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process is, so that the run stops the way Ctrl-C stops it."""


@contextmanager
def _sigterm_as_interrupt():
    def handler(signum, frame):
        raise Terminated()

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (e.g. inside a test runner's worker): leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@main.command()
@click.argument("recipes", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--trust-pickle", is_flag=True, help="Accept checkpoints that have only pickled weights.")
def validate(recipes: tuple[Path, ...], trust_pickle: bool) -> None:
    """Check RECIPES without loading any model; exit 2 if any is invalid."""
    from deftcompress.pipeline.recipe import Recipe

    failed = 0
    for path in recipes:
        try:
            expanded = Recipe.all_from_file(path, trust_pickle=trust_pickle)  # a sweep: every point is checked
            r = expanded[0]
            grid = f"; a sweep of {len(expanded)} runs: {', '.join(x.name for x in expanded)}" if r.sweep_values else ""
            click.echo(f"ok: {path} ({len(r.plan)} passes: {', '.join(p.name for p in r.plan)}{grid})")
        except DeftcompressError as exc:
            for problem in getattr(exc, "errors", None) or [exc]:  # every problem found, each on its line
                click.echo(f"error: {problem}", err=True)
            failed += 1
    if failed:
        sys.exit(2)


@main.command(name="passes")
@click.argument("names", nargs=-1)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def list_passes(names: tuple[str, ...], as_json: bool) -> None:
    """List every pass (or the NAMES given) with its config fields, types, defaults and meaning."""
    from deftcompress.pipeline.recipe import RecipeSettings
    from deftcompress.core.config import describe_fields
    from deftcompress.core.registry import all_passes, describe_pass, get_pass

    try:
        chosen = [get_pass(n, "passes") for n in names] if names else list(all_passes().values())
    except DeftcompressError as exc:
        _fail(exc)
    described = [describe_pass(cls) for cls in chosen]
    if as_json:
        click.echo(json.dumps({"recipe": describe_fields(RecipeSettings), "passes": described}, indent=2, default=str))
        return
    if not names:
        click.echo("recipe fields (top level; besides `passes:` and an optional `sweep:`):")
        for f in describe_fields(RecipeSettings):
            click.echo(f"    {f['name']}: {f['type']} = {f['default']!r}\n        {f['help']}")
    for d in described:
        click.echo(f"\n{d['name']}: {d['summary']}")
        for f in d["fields"] or []:
            click.echo(f"    {f['name']}: {f['type']} = {f['default']!r}\n        {f['help']}")
        if not d["fields"]:
            click.echo("    (no options)")


@main.command()
@click.argument("inputs", nargs=-1, required=True)
@click.option("-o", "--output-dir", type=click.Path(path_type=Path),
              help="Folder for compare.{json,md,csv,png} (default runs/compare-<first name>).")
@click.option("--data-dir", type=click.Path(), help="Local data folder (overrides $DEFTCOMPRESS_DATA_DIR).")
@click.option("--no-timing", is_flag=True, help="Do not time the models side by side; show each run's own figures.")
@click.option("--retime", is_flag=True, help="Time the models again even if compare.json holds a timing of the same runs.")
@click.option("--rows", type=click.IntRange(1, 100_000), default=64, show_default=True, help="Evaluation rows timed.")
@click.option("--repeats", type=click.IntRange(1, 1000), default=5, show_default=True, help="Timing repetitions (median).")
@click.option("--threads", type=click.IntRange(1, 1024), default=None, help="torch threads while timing.")
@click.option("--rank-loaded", is_flag=True, help="Rank timings even if other processes loaded the machine meanwhile.")
@click.option("--trust-pickle", is_flag=True, help="Accept checkpoints that have only pickled weights.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars or run log; only the final table.")
@click.option("--json", "as_json", is_flag=True, help="Print compare.json instead of the table (for scripts).")
def compare(inputs: tuple[str, ...], output_dir: Path | None, data_dir: str | None, no_timing: bool, retime: bool, rows: int,
            repeats: int, threads: int | None, rank_loaded: bool, trust_pickle: bool, quiet: bool, as_json: bool) -> None:
    """Compare runs: INPUTS are recipes (a sweep expands into its runs) or finished run folders.

    Each recipe without a finished run is run (a finished run of the same resolved recipe is reused,
    an unfinished one resumed); every final model is then timed side by side in this process, and
    compare.json / compare.md / compare.csv / compare.png are written: score, density, size and
    latency per run, with the Pareto fronts marked.
    """
    from deftcompress.pipeline.compare_runs import Workload, compare as run_compare
    from deftcompress.reporting.compare_tables import text_table

    _quiet_libraries()
    log = (lambda text: None) if quiet or as_json else (lambda text: click.echo(text, err=True))
    command = "deftcompress compare " + " ".join(sys.argv[2:]) if len(sys.argv) > 2 else "deftcompress compare"
    with _one_line_errors(lambda: output_dir or "compare", lambda: "; finished runs are kept: run the same command to go on"):
        table_rows, folder = run_compare(list(inputs), output_dir, timing=not no_timing,
                                         workload=Workload(rows=rows, repeats=repeats, threads=threads,
                                                           rank_loaded=rank_loaded),
                                         quiet=quiet or as_json, trust_pickle=trust_pickle, retime=retime, log=log,
                                         command=command, data_dir=data_dir)
    if as_json:
        click.echo((folder / "compare.json").read_text())
        return
    click.echo(text_table(table_rows))
    click.echo(f"\noutputs: {folder}/ (compare.md, compare.csv, compare.json, compare.png)")


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--markdown", is_flag=True, help="Print report.md instead of the text table.")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also draw per-layer density of every step (encoder and decoder panels) to this PNG.")
def report(run_dir: Path, markdown: bool, plot: Path | None) -> None:
    """Print the table of a finished run."""
    from deftcompress.reporting.report import Report

    path = run_dir / "report.json"
    if not path.is_file():
        click.echo(f"error: {path}: not found (is {run_dir} a finished run?)", err=True)
        sys.exit(2)
    try:
        rep = Report.load(run_dir)
    except (ValueError, KeyError, TypeError) as exc:
        click.echo(f"error: {path}: not a deftcompress report ({type(exc).__name__}: {exc})", err=True)
        sys.exit(2)
    click.echo((run_dir / "report.md").read_text() if markdown and (run_dir / "report.md").is_file() else rep.text_table())
    if plot is not None:
        from deftcompress.reporting.plots import plot_density

        drawn = plot_density(rep, plot)
        click.echo(f"\n{'wrote ' + str(drawn) if drawn else 'no picture: matplotlib missing or no per-layer density'}")


if __name__ == "__main__":
    main()
