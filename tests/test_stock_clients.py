"""Every folder deftcompress saves, opened by stock clients (transformers' Auto class and the concrete class that
config.json names, peft): the same logits as deftcompress's own load (within 1e-4), or a loud error that names
deftcompress. Never a model that quietly computes something else (issues 22 and 27).

Two parts: whole runs (a recipe's `model/`, opened in this process), and one folder per saved format built
directly from the tiny models of conftest.py, all opened by one fresh interpreter that never imports deftcompress.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from deftcompress import Recipe, run_recipe

TRAIN = {"method": "lora", "r": 2, "max_steps": 2, "batch_size": 8, "max_train_samples": 16, "merge": True}
RUNS = {
    "deft_fold_weights": [{"deft": TRAIN}],
    "deft_fold_activation": [{"deft": {**TRAIN, "activation_scale_fold": "activation"}}],
    "structured_prune": [{"structured_prune": {"mlp_ratio": 0.5, "round_to": 8}}],
    "torch_int8": [{"deft": {**TRAIN, "activation_scale_fold": "activation"}}, {"quantize": {"backend": "torch_int8"}}],
    "shifted_relu": [{"relufy": {"activation": "shifted_relu", "threshold": 0.1}}],
    "plain_relu": [{"relufy": {"activation": "relu"}}],
}
RUNS_STOCK_LOADS = {"deft_fold_weights", "plain_relu"}


def _run_logits(model, inputs):
    model.eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor(inputs), attention_mask=torch.ones(len(inputs), len(inputs[0]),
                                                                                dtype=torch.long)).logits


@pytest.mark.parametrize("case", sorted(RUNS))
def test_stock_transformers_reproduces_or_refuses(tiny_checkpoint, tiny_data, tmp_path, one_thread, case):
    from transformers import AutoModelForSequenceClassification

    from deftcompress.models.formats import load_model

    recipe = Recipe.build(name=case, model=str(tiny_checkpoint("bert")), data_dir=str(tiny_data), max_eval_samples=8,
                          eval_batch_size=8, latency_repeats=0, passes=RUNS[case])
    out = tmp_path / "run"
    run_recipe(recipe, output_dir=out, quiet=True)
    model_dir = out / "model"
    manifest = json.loads((model_dir / "deftcompress_model.json").read_text())
    torch.manual_seed(1)
    inputs = torch.randint(5, 1000, (3, 9)).tolist()
    ours, _, _ = load_model(model_dir)
    if case in RUNS_STOCK_LOADS:
        stock = AutoModelForSequenceClassification.from_pretrained(model_dir)
        torch.testing.assert_close(_run_logits(stock, inputs), _run_logits(ours, inputs), atol=1e-4, rtol=1e-4)
        assert manifest.get("stock_loading") != "refused"
    else:
        with pytest.raises((ValueError, KeyError, OSError)) as refused:
            AutoModelForSequenceClassification.from_pretrained(model_dir)
        assert "deftcompress" in str(refused.value)
        assert manifest["stock_loading"] == "refused" and "deftcompress.load_model" in manifest["load"]
        assert "deftcompress" in (model_dir / "README.md").read_text()
    torch.testing.assert_close(_run_logits(load_model(model_dir)[0], inputs), _run_logits(ours, inputs))


# ---- one folder per saved format, opened by a stock interpreter ------------------------------------------------

# What a user without deftcompress types: the Auto class, the concrete class config.json names, and peft.
STOCK = textwrap.dedent("""
    import json, sys
    import torch
    import transformers

    jobs = json.load(open(sys.argv[1]))
    results = {}
    for job in jobs:
        inputs = {k: torch.tensor(v) for k, v in job["inputs"].items()}
        for how in job["hows"]:
            try:
                if how == "peft":
                    import peft

                    base = getattr(transformers, job["auto"]).from_pretrained(job["base"])
                    model = peft.PeftModel.from_pretrained(base, job["folder"])
                elif how == "concrete":
                    architecture = json.load(open(job["folder"] + "/config.json"))["architectures"][0]
                    model = getattr(transformers, architecture).from_pretrained(job["folder"])
                else:
                    model = getattr(transformers, job["auto"]).from_pretrained(job["folder"])
                model.eval()
                with torch.no_grad():
                    results[job["name"] + ":" + how] = {"logits": model(**inputs).logits.float().tolist()}
            except Exception as exc:
                results[job["name"] + ":" + how] = {"error": type(exc).__name__ + ": " + str(exc)}
    assert not any(m.startswith("deftcompress") for m in sys.modules)
    print(json.dumps(results))
""")

SEQ_CLS, SEQ2SEQ = "AutoModelForSequenceClassification", "AutoModelForSeq2SeqLM"


@dataclass
class Case:
    """One saved folder: how stock clients open it, what deftcompress's own load of it computes, and whether stock
    clients must compute the same (`same`) or refuse (`refuses`)."""

    folder: Path
    expect: str
    ours: torch.Tensor  # deftcompress's own load of the folder
    in_memory: torch.Tensor  # the model that was saved
    hows: tuple[str, ...] = ("auto", "concrete")
    auto: str = SEQ_CLS
    base: Path | None = None  # what peft loads the adapter onto
    inputs: dict = field(default_factory=dict)
    unnamed: tuple[str, ...] = ()  # ways of opening it that may refuse without naming deftcompress


def _inputs(text_to_text: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(5, 1000, (2, 9), generator=g)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if text_to_text:
        inputs["decoder_input_ids"] = torch.tensor([[0, 5, 9], [0, 7, 1]])
    return inputs


@torch.no_grad()
def _logits(model, inputs) -> torch.Tensor:
    model.eval()
    return model(**inputs).logits.float()


def _state(tiny_checkpoint, tiny_data, work: Path, family: str):
    """A PipelineState holding a fresh tiny model (conftest's pipeline_state, for a module-scoped fixture)."""
    from deftcompress.data.tasks import get_task
    from deftcompress.models.loading import load_model_and_tokenizer
    from deftcompress.pipeline.recipe import Recipe as PipelineRecipe
    from deftcompress.pipeline.runner import PipelineState

    ref = str(tiny_checkpoint(family))
    recipe = PipelineRecipe.build(model=ref, task="glue/sst2", data_dir=str(tiny_data), passes=[{"evaluate": {}}])
    spec = get_task("glue/sst2")
    torch.manual_seed(0)
    model, tokenizer, arch = load_model_and_tokenizer(ref, spec)
    work.mkdir(parents=True, exist_ok=True)
    return PipelineState(recipe=recipe, task=spec, arch=arch, model=model, tokenizer=tokenizer,
                         device=torch.device("cpu"), work_dir=work, quiet=True)


def _run_pass(state, name: str, **config):
    from deftcompress.core.config import parse_config
    from deftcompress.core.registry import get_pass

    cls = get_pass(name, "test")
    state.step_index += 1
    return cls(parse_config(cls.Config, config, "test")).run(state)


def _scales(model, seed: int = 1) -> dict[str, torch.Tensor]:
    """Per-neuron scales s in [1, 4), keyed as DEFT saves them (`<block label>.scale`)."""
    from deftcompress.architecture import mlp_blocks

    g = torch.Generator().manual_seed(seed)
    return {f"{b.label}.scale": 1 + 3 * torch.rand(int(b.down.in_features), generator=g) for b in mlp_blocks(model)}


@torch.no_grad()
def _fold(model, scales: dict[str, torch.Tensor], where: str) -> None:
    """What DEFT's ActivationScales.fold(model, where) does with trained scales (`weights`, `activation`, `module`)."""
    from deftcompress.architecture import mlp_blocks
    from deftcompress.architecture.activation_scale import record_scaled_activations, scale_columns, scale_rows, \
        wrap_activation

    blocks = mlp_blocks(model)
    for b in blocks:
        s = scales[f"{b.label}.scale"]
        if where != "module":
            scale_rows(b.up, s, b.names["up"])
        if where == "weights":
            scale_columns(b.down, 1.0 / s, b.names["down"])
        else:
            wrap_activation(model, b, 1.0 / s, pre_scale=s if where == "module" else None)
    if where != "weights":
        record_scaled_activations(model, [b.label for b in blocks], pre_scale=where == "module")


def _wrapped(state, method: str = "lora"):
    """The state's model under deftcompress's PEFT wrapper, with adapter weights that change the output."""
    from deftcompress.peft_methods.settings import PeftSettings
    from deftcompress.peft_methods.wrapping import wrap_model

    wrapped = wrap_model(state.model, state.arch, state.task, PeftSettings(method=method, r=2, num_virtual_tokens=3)).model
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in wrapped.parameters():
            if p.requires_grad:  # LoRA A/B, virtual tokens, the trained head's copy
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    return wrapped


def _saved(state, folder: Path, expect: str, auto: str = SEQ_CLS, merge_adapters: bool = True) -> Case:
    from deftcompress.models.formats import load_model, save_model

    inputs = _inputs(auto == SEQ2SEQ)
    in_memory = _logits(state.model, inputs)
    save_model(state.model, folder, merge_adapters=merge_adapters, tokenizer=state.tokenizer)
    return Case(folder, expect, _logits(load_model(folder)[0], inputs), in_memory, auto=auto, inputs=inputs)


def _deft_pass_folders(state, checkpoint: Path, pass_dir: Path) -> dict[str, Case]:
    """What a DEFT pass writes beside the run: deftcompress's own adapter form (trained on scaled MLP weights: the
    scales ride along) and the plain-peft form, both meant for the checkpoint the pass started from."""
    from safetensors.torch import save_file

    from deftcompress.architecture import mlp_blocks
    from deftcompress.architecture.activation_scale import SAVED_SCALES_FILE
    from deftcompress.models.loading import load_model_and_tokenizer
    from deftcompress.peft_methods.plain_peft import PLAIN_PEFT_DIR, save_plain_peft_adapter
    from deftcompress.peft_methods.saving import hide_from_plain_loaders, load_adapter_into, save_adapter

    model = _wrapped(state)
    scales = _scales(model)
    _fold(model, scales, "weights")
    inputs = _inputs()
    in_memory = _logits(model, inputs)
    own = pass_dir / "adapter"  # as training/deft_run.py writes it
    save_adapter(model, own)
    save_file(scales, str(own / SAVED_SCALES_FILE))
    hide_from_plain_loaders(own)
    ours = _logits(load_adapter_into(load_model_and_tokenizer(str(checkpoint), state.task)[0], own, "peft"), inputs)
    names = [b.names[part] for b in mlp_blocks(model.get_base_model()) for part in ("up", "down")]
    save_plain_peft_adapter(model, pass_dir / PLAIN_PEFT_DIR, names)
    common = dict(ours=ours, in_memory=in_memory, hows=("peft", "auto"), base=checkpoint, inputs=inputs)
    # peft meets no adapter_config.json in the own form (the folder's README names deftcompress and the plain form)
    return {"deft_adapter_own_form": Case(own, "refuses", unnamed=("peft", "auto"), **common),
            "deft_adapter_plain_peft": Case(pass_dir / PLAIN_PEFT_DIR, "same", **common)}


def _build_cases(tiny_checkpoint, tiny_data, root: Path) -> dict[str, Case]:
    from deftcompress.architecture import mlp_blocks
    from deftcompress.architecture.activation import replace_activations
    from deftcompress.architecture.layout import record_layout
    from deftcompress.architecture.skip import skip_mlp_blocks

    cases: dict[str, Case] = {}

    def state(family="bert"):
        return _state(tiny_checkpoint, tiny_data, root / "work", family)

    # stock configs: transformers builds the same model
    cases["plain"] = _saved(state(), root / "plain", "same")
    s = state()
    _fold(s.model, _scales(s.model), "weights")
    cases["scales_in_weights"] = _saved(s, root / "scales_in_weights", "same")
    s = state()
    replace_activations(s.model, "relu")
    cases["relu"] = _saved(s, root / "relu", "same")
    s = state()
    _run_pass(s, "quantize", backend="bnb_8bit")  # bnb_4bit: bitsandbytes' CPU kernel cannot tile tiny shapes
    cases["bnb_8bit"] = _saved(s, root / "bnb_8bit", "same")

    # structure only deftcompress builds: stock clients must refuse
    s = state()
    _fold(s.model, _scales(s.model), "activation")  # activation_scale_fold: activation (issue 27)
    cases["scales_activation"] = _saved(s, root / "scales_activation", "refuses")
    s = state()
    _fold(s.model, _scales(s.model), "module")
    cases["scales_module"] = _saved(s, root / "scales_module", "refuses")
    s = state("t5_gated")
    _fold(s.model, _scales(s.model), "activation")
    cases["scales_activation_t5"] = _saved(s, root / "scales_activation_t5", "refuses", auto=SEQ2SEQ)
    s = state()
    replace_activations(s.model, "shifted_relu", threshold=0.05)
    cases["shifted_relu"] = _saved(s, root / "shifted_relu", "refuses")
    s = state()
    _run_pass(s, "structured_prune", mlp_ratio=0.5, head_ratio=0.5)
    cases["pruned"] = _saved(s, root / "pruned", "refuses")
    s = state("llama")
    _run_pass(s, "structured_prune", mlp_ratio=0.5, head_ratio=0.5)
    cases["pruned_llama"] = _saved(s, root / "pruned_llama", "refuses")
    s = state()
    skip_mlp_blocks(s.model, [mlp_blocks(s.model)[1].label], s.arch)
    record_layout(s.model, s.arch)
    cases["skipped"] = _saved(s, root / "skipped", "refuses")
    s = state()
    _run_pass(s, "quantize", backend="torch_int8")
    # a concrete class looks for model.safetensors before it builds anything, and an int8 folder has none
    cases["torch_int8"] = _saved(s, root / "torch_int8", "refuses")
    cases["torch_int8"].unnamed = ("concrete",)
    s = state()
    _fold(s.model, _scales(s.model), "activation")
    _run_pass(s, "quantize", backend="torch_int8")  # deft_then_quantize with the activation fold
    cases["torch_int8_scales"] = _saved(s, root / "torch_int8_scales", "refuses")
    cases["torch_int8_scales"].unnamed = ("concrete",)
    s = state()
    _fold(s.model, _scales(s.model), "activation")
    _run_pass(s, "quantize", backend="bnb_8bit")
    cases["bnb_8bit_scales"] = _saved(s, root / "bnb_8bit_scales", "refuses")

    # base + adapter (the state after a pass; a final model/ whose adapter cannot merge): peft loads adapter/ onto
    # base/, a stock checkpoint unless the base itself needs deftcompress
    for name, where, method, merge, expect in (("base_adapter_lora", "weights", "lora", False, "same"),
                                               ("base_adapter_prompt", "weights", "prompt", True, "same"),
                                               ("base_adapter_lora_activation", "activation", "lora", False, "refuses")):
        s = state()
        s.model = _wrapped(s, method)
        _fold(s.model, _scales(s.model), where)
        case = _saved(s, root / name, expect, merge_adapters=merge)
        case.hows, case.base, case.folder = ("peft",), case.folder / "base", case.folder / "adapter"
        cases[name] = case

    cases.update(_deft_pass_folders(state(), tiny_checkpoint("bert"), root / "passes" / "01_deft"))
    return cases


@pytest.fixture(scope="module")
def stock_results(tiny_checkpoint, tiny_data, tmp_path_factory):
    """(cases, the stock interpreter's answer per case and way of opening it, the folder they all lie under)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        root = tmp_path_factory.mktemp("stock")
        cases = _build_cases(tiny_checkpoint, tiny_data, root)
    finally:
        torch.set_num_threads(threads)
    jobs = [{"name": name, "folder": str(c.folder), "base": str(c.base) if c.base else None, "auto": c.auto,
             "hows": list(c.hows), "inputs": {k: v.tolist() for k, v in c.inputs.items()}} for name, c in cases.items()]
    (root / "jobs.json").write_text(json.dumps(jobs))
    proc = subprocess.run([sys.executable, "-c", STOCK, str(root / "jobs.json")], capture_output=True, text=True,
                          timeout=300, env={"OMP_NUM_THREADS": "1", "PATH": "", "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return cases, json.loads(proc.stdout.strip().splitlines()[-1]), root


FORMATS = ("plain", "scales_in_weights", "relu", "bnb_8bit", "scales_activation", "scales_module", "scales_activation_t5",
           "shifted_relu", "pruned", "pruned_llama", "skipped", "torch_int8", "torch_int8_scales", "bnb_8bit_scales",
           "base_adapter_lora", "base_adapter_prompt", "base_adapter_lora_activation", "deft_adapter_own_form",
           "deft_adapter_plain_peft")


@pytest.mark.parametrize("name", FORMATS)
def test_stock_clients_compute_the_same_or_refuse_naming_deftcompress(stock_results, name):
    cases, results, root = stock_results
    case = cases[name]
    torch.testing.assert_close(case.ours, case.in_memory, atol=1e-5, rtol=1e-5)  # deftcompress reads back what it saved
    for how in case.hows:
        got = results[f"{name}:{how}"]
        if "logits" in got:
            assert case.expect == "same", f"{name}: stock {how} loaded a folder only deftcompress builds right"
            torch.testing.assert_close(torch.tensor(got["logits"]), case.ours, atol=1e-4, rtol=1e-4,
                                       msg=lambda m: f"{name}: stock {how} computes another model: {m}")
        else:
            error = got["error"].replace(str(root), "<tmp>")  # the folder's own path must not be what names us
            assert case.expect == "refuses", f"{name}: stock {how} failed on a stock folder: {error[:500]}"
            assert "deftcompress" in error or how in case.unnamed, \
                f"{name}: stock {how} refused without naming deftcompress: {error[:500]}"


def test_the_own_adapter_form_says_what_loads_it(stock_results):
    """The DEFT adapter that needs its scales has no library config under the library's name, and says why."""
    cases, _, _ = stock_results
    own = cases["deft_adapter_own_form"].folder
    assert not (own / "adapter_config.json").exists() and (own / "deftcompress_adapter_config.json").is_file()
    readme = (own / "README.md").read_text()
    assert "deftcompress" in readme and "adapter_plain_peft" in readme


def test_manifests_say_whether_stock_transformers_loads_the_folder(stock_results):
    cases, _, _ = stock_results
    for name, case in cases.items():
        if (case.folder / "deftcompress_model.json").is_file():  # a model: the manifest says what stock clients did
            manifest = json.loads((case.folder / "deftcompress_model.json").read_text())
            assert (manifest.get("stock_loading") == "refused") == (case.expect == "refuses"), name
        elif (case.folder.parent / "deftcompress_model.json").is_file():  # base + adapter: peft only where base/ loads
            manifest = json.loads((case.folder.parent / "deftcompress_model.json").read_text())
            assert ("PeftModel.from_pretrained" in manifest["load"]) == (case.expect == "same"), name
