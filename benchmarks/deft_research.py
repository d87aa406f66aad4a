"""DEFT research runs: which density loss / schedule cuts exact-nonzero MLP activation density on a short CPU budget.

Fixed setup (matches benchmarks/deft_vs_peft.py's budget): all-MiniLM-L6-v2 (embedded alias ``minilm``), GLUE SST-2,
8,000 shuffled train rows (seed 0), batch 32, max length 64, dynamic padding, AdamW lr 5e-4 (weight decay 0.01),
6% warm-up then linear decay, LoRA r=8 alpha=16 on query, value, intermediate.dense (+ classifier head), all 872 dev
rows. Density: exact nonzero MLP activations over real tokens (``deftcompress.measurement.evaluation.evaluate``, masked mode).

Each run prints one JSON line and appends it to benchmarks/results/deft_research.jsonl.

    export DEFTCOMPRESS_DATA_DIR=/work/shared/data
    python benchmarks/deft_research.py --name peft --loss none --seed 0
    python benchmarks/deft_research.py --name preact_ctrl --loss preact --temperature 1 --target 0.35 \
        --ctrl-rate 2 --train-bias up --bias-lr 0.05 --seed 0
    python benchmarks/deft_research.py --summarize   # writes benchmarks/results/deft_research.md

Losses (per layer: mean over real tokens and features; then mean over layers):
- ``paper``:  a^2 / (a^2 + eps) on the activation output a (eps optionally scheduled log-linearly eps_start -> eps).
- ``preact``: sigmoid((x - theta) / T) on the pre-activation x (theta = -5.54 - margin; GELU(x) == 0 in float32
  for x <= -5.5431).
- ``hinge``:  min(relu(x - theta), cap) / cap on the pre-activation.
Weighting: a constant ``--weight`` (optionally ramped after a task-only warm-up), or a Lagrange multiplier per layer
(``--target``): lambda_l <- max(0, lambda_l + ctrl_rate * (density_l(batch) - target_l)) every step, where density_l is the
exact-nonzero density of the training batch (real tokens).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "deft_research.jsonl"
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing
GELU_ZERO = -5.5431  # GELU(x) (erf form, float32) is exactly 0 for x <= this


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", default="run", help="variant name (free text, recorded)")
    p.add_argument("--loss", choices=["none", "paper", "preact", "hinge"], default="none")
    p.add_argument("--weight", type=float, default=0.0, help="constant density weight (ignored with --target)")
    p.add_argument("--eps", type=float, default=1e-7, help="paper loss eps (final)")
    p.add_argument("--eps-start", type=float, default=None, help="paper loss: eps decays log-linearly from this to --eps")
    p.add_argument("--temperature", type=float, default=2.0, help="preact: sigmoid temperature T")
    p.add_argument("--margin", type=float, default=0.0, help="preact/hinge: push below GELU_ZERO - margin")
    p.add_argument("--cap", type=float, default=4.0, help="hinge: cap of the hinge (loss in [0,1])")
    p.add_argument("--density-warmup", type=float, default=0.0, help="fraction of steps with no density loss")
    p.add_argument("--ramp", type=float, default=0.0, help="fraction of steps over which the weight/target ramps in")
    p.add_argument("--target", type=float, default=None, help="target density (Lagrange multiplier controller)")
    p.add_argument("--layer-targets", default=None, help="comma list of per-layer targets (overrides --target)")
    p.add_argument("--ctrl-rate", type=float, default=1.0, help="multiplier step per unit density error per step")
    p.add_argument("--lambda-max", type=float, default=100.0)
    p.add_argument("--lambda-lr-scale", action="store_true", help="multiply the multiplier by lr(t)/lr_max")
    p.add_argument("--train-bias", choices=["none", "up", "up_down"], default="none",
                   help="train intermediate.dense bias (up) and optionally output.dense bias (down)")
    p.add_argument("--bias-lr", type=float, default=5e-4)
    p.add_argument("--bias-const-lr", action="store_true", help="bias lr without the decay schedule")
    p.add_argument("--density-grad", choices=["all", "bias", "aux"], default="all",
                   help="bias: the density loss reaches only the trainable up-projection bias (LoRA serves the task); "
                        "aux: only the scale and/or bias (not LoRA)")
    p.add_argument("--select-frac", type=float, default=None,
                   help="apply the density loss only to this fraction of neurons per layer, the least important ones "
                        "(importance = mean |GELU(x_i)| * ||W_down[:, i]|| on 512 train rows, pretrained model)")
    p.add_argument("--scale", action="store_true",
                   help="trainable per-neuron pre-activation scale s=exp(rho): up output * s, down input / s "
                        "(GELU(s x)/s -> ReLU-like, exact zeros for x < -5.54/s; mergeable into W_up, b_up, W_down)")
    p.add_argument("--scale-lr", type=float, default=0.05)
    p.add_argument("--scale-min", type=float, default=None, help="clamp the scale from below (e.g. 1: never flatten GELU)")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--steps", type=int, default=250)
    p.add_argument("--train-rows", type=int, default=8000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-at", default="", help="comma list of extra steps to evaluate at (checkpoint selection)")
    p.add_argument("--select-target", type=float, default=None,
                   help="choose among evaluated checkpoints: best accuracy with density <= this (else lowest density)")
    p.add_argument("--timing-only", action="store_true", help="no evaluation; record step times only (jsonl: timing rows)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--no-append", action="store_true")
    p.add_argument("--summarize", action="store_true", help="write the markdown table from the jsonl and exit")
    return p.parse_args(argv)


def run(args) -> dict:
    import torch
    from peft import LoraConfig, TaskType, get_peft_model

    from deftcompress.architecture import mlp_blocks
    from deftcompress.measurement.density import ActivationTap
    from deftcompress.measurement.evaluation import EvalSettings, evaluate
    from deftcompress.core.model_refs import alias_path
    from deftcompress.models.loading import load_model_and_tokenizer
    from deftcompress.data.tasks import get_task, load_examples

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    task = get_task("glue/sst2")
    train = load_examples(task, "train", max_samples=args.train_rows, seed=0)
    dev = load_examples(task, "validation")
    model, tok, arch = load_model_and_tokenizer(str(alias_path("minilm")), task)
    model = get_peft_model(model, LoraConfig(task_type=TaskType.SEQ_CLS, r=8, lora_alpha=16, lora_dropout=0.0,
                                             target_modules=["query", "value", "intermediate.dense"]))
    blocks = mlp_blocks(model, arch)
    nl = len(blocks)
    sel_masks = None
    if args.select_frac is not None:
        sel_masks = neuron_selection(model, tok, blocks, train[:512], args.select_frac, args.max_length)
    bias_params = []
    if args.train_bias != "none":
        for b in blocks:
            mods = [b.up] + ([b.down] if args.train_bias == "up_down" else [])
            for m in mods:
                base = getattr(m, "base_layer", m)
                base.bias.requires_grad_(True)
                bias_params.append(base.bias)
    scale_params = []
    hooks = []
    log_min = math.log(args.scale_min) if args.scale_min else None

    def scale_of(rho):  # the lower bound is kept by projecting rho after every optimizer step
        return rho.exp()

    if args.scale:
        for b in blocks:
            rho = torch.nn.Parameter(torch.zeros(b.act_width if hasattr(b, "act_width") else
                                                 getattr(b.up, "base_layer", b.up).out_features))
            scale_params.append(rho)
            hooks.append(b.up.register_forward_hook(lambda mod, inp, out, rho=rho: out * scale_of(rho)))
            hooks.append(b.down.register_forward_pre_hook(lambda mod, inp, rho=rho: (inp[0] / scale_of(rho),) + tuple(inp[1:])))
    bias_ids = {id(p) for p in bias_params}
    main = [p for p in model.parameters() if p.requires_grad and id(p) not in bias_ids]
    decay = [p for p in main if p.ndim > 1]
    no_decay = [p for p in main if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": 0.01, "lr": args.lr}, {"params": no_decay, "weight_decay": 0.0, "lr": args.lr}]
    if bias_params:
        groups.append({"params": bias_params, "weight_decay": 0.0, "lr": args.bias_lr})
    if scale_params:
        groups.append({"params": scale_params, "weight_decay": 0.0, "lr": args.scale_lr})
    opt = torch.optim.AdamW(groups, lr=args.lr)
    warm = max(1, int(0.06 * args.steps))

    def lr_mult(step):  # step = number of optimizer steps already taken
        if step < warm:
            return (step + 1) / warm
        return max(0.0, (args.steps - step) / max(1, args.steps - warm))

    lambdas = [lr_mult] * 2 + ([(lambda s: 1.0) if args.bias_const_lr else lr_mult] if bias_params else [])
    lambdas += [(lambda s: 1.0) if args.bias_const_lr else lr_mult] if scale_params else []
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambdas)

    # data: tokenize once, reshuffle each epoch, dynamic padding
    enc = tok([e["text_a"] for e in train], truncation=True, max_length=args.max_length)
    labels = [e["label"] for e in train]
    g = random.Random(1000 + args.seed)

    def batches():
        while True:
            order = list(range(len(train)))
            g.shuffle(order)
            for s in range(0, len(order) - args.batch_size + 1, args.batch_size):
                idx = order[s:s + args.batch_size]
                items = [{"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i],
                          "token_type_ids": enc["token_type_ids"][i]} for i in idx]
                batch = tok.pad(items, return_tensors="pt", padding="longest")
                batch["labels"] = torch.tensor([labels[i] for i in idx])
                yield batch

    use_density = args.loss != "none"
    theta = GELU_ZERO - args.margin
    if args.layer_targets:
        targets = [float(x) for x in args.layer_targets.split(",")]
        assert len(targets) == nl
    elif args.target is not None:
        targets = [args.target] * nl
    else:
        targets = None
    lam = torch.zeros(nl)
    state = {"mask": None, "terms": [], "dens": [], "eps": args.eps}
    index = {id(b): i for i, b in enumerate(blocks)}

    def tap(block, pre, act):
        if not torch.is_grad_enabled():  # evaluation forwards (evaluate runs under no_grad)
            return
        m = state["mask"]  # [B, T, 1] float
        n = m.sum() * act.shape[-1]
        with torch.no_grad():
            state["dens"].append(((act != 0).float() * m).sum() / n)
        if not use_density:
            return
        i = index[id(block)]
        if args.density_grad == "bias":
            b = getattr(block.up, "base_layer", block.up).bias
            pre = pre.detach() + (b - b.detach())
        elif args.density_grad == "aux":
            sc = scale_of(scale_params[i]) if scale_params else None
            x = pre.detach() / sc.detach() if sc is not None else pre.detach()
            if bias_params:
                b = getattr(block.up, "base_layer", block.up).bias
                x = x + (b - b.detach())
            pre = x * sc if sc is not None else x
        if args.loss == "paper":
            a2 = act * act
            v = a2 / (a2 + state["eps"])
        elif args.loss == "preact":
            v = torch.sigmoid((pre - theta) / args.temperature)
        else:
            v = torch.clamp(torch.relu(pre - theta), max=args.cap) / args.cap
        if sel_masks is not None:
            sm = sel_masks[i]
            state["terms"].append((v * m * sm).sum() / (m.sum() * sm.sum()))
        else:
            state["terms"].append((v * m).sum() / n)

    eval_at = [] if args.timing_only else sorted({int(s) for s in args.eval_at.split(",") if s.strip()} | {args.steps})
    settings = EvalSettings(max_seq_length=args.max_length, batch_size=64)
    checkpoints = []
    log = []
    model.train()
    it = batches()
    t_train = 0.0
    step_times = []
    t0 = time.perf_counter()
    with ActivationTap(blocks, tap):
        for step in range(args.steps):
            ts = time.perf_counter()
            batch = next(it)
            state["mask"] = batch["attention_mask"].unsqueeze(-1).float()
            state["terms"], state["dens"] = [], []
            frac = step / args.steps
            if args.loss == "paper" and args.eps_start:
                r = min(1.0, max(0.0, (frac - args.density_warmup) / max(1e-9, 0.8 - args.density_warmup)))
                state["eps"] = math.exp(math.log(args.eps_start) + r * (math.log(args.eps) - math.log(args.eps_start)))
            out = model(**batch)
            task_loss = out.loss
            # schedule: 0 before density_warmup, ramps to 1 over `ramp`
            if frac < args.density_warmup:
                ramp = 0.0
            elif args.ramp > 0:
                ramp = min(1.0, (frac - args.density_warmup) / args.ramp)
            else:
                ramp = 1.0
            dens = torch.stack(state["dens"]).detach()
            dl = torch.zeros(())
            if use_density and ramp > 0:
                terms = torch.stack(state["terms"])
                if targets is not None:
                    # target ramps from the current (pre-warm-up) density 1.0 down to the target
                    tgt = torch.tensor([1.0 - ramp * (1.0 - t) for t in targets])
                    lam = torch.clamp(lam + args.ctrl_rate * (dens - tgt), 0.0, args.lambda_max)
                    w = lam * (sched.get_last_lr()[0] / args.lr if args.lambda_lr_scale else 1.0)
                    dl = (w * terms).sum() / nl
                else:
                    dl = args.weight * ramp * terms.mean()
            loss = task_loss + dl
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if log_min is not None:
                with torch.no_grad():
                    for rho in scale_params:
                        rho.clamp_(min=log_min)
            step_times.append(time.perf_counter() - ts)
            if step % 25 == 0 or step == args.steps - 1:
                rec = {"step": step, "task": round(task_loss.item(), 4), "dl": round(float(dl), 4),
                       "dens": round(dens.mean().item(), 4), "lam": [round(x, 2) for x in lam.tolist()]}
                log.append(rec)
                print(json.dumps(rec), file=sys.stderr, flush=True)
            if step + 1 in eval_at:
                t_train += time.perf_counter() - t0
                ev = evaluate(model, tok, task, dev, arch, settings, progress=False)
                d = ev.density
                checkpoints.append({"step": step + 1, "accuracy": round(ev.task_score, 4), "density": round(d.overall(), 4),
                                    "per_layer": [round(l.density, 3) for l in d.per_layer]})
                print(json.dumps(checkpoints[-1]), file=sys.stderr, flush=True)
                model.train()
                t0 = time.perf_counter()
    if args.timing_only:
        checkpoints = [{"step": args.steps, "accuracy": None, "density": None, "per_layer": None}]
        t_train = time.perf_counter() - t0
    chosen = checkpoints[-1]
    if args.select_target is not None and len(checkpoints) > 1 and not args.timing_only:
        ok = [c for c in checkpoints if c["density"] <= args.select_target]
        chosen = max(ok, key=lambda c: c["accuracy"]) if ok else min(checkpoints, key=lambda c: c["density"])
    st = sorted(step_times[5:] or step_times)
    scale_stats = None
    if scale_params:
        allr = scale_of(torch.cat([r.detach() for r in scale_params]))
        scale_stats = {"median": round(allr.median().item(), 2), "min": round(allr.min().item(), 2), "max": round(allr.max().item(), 2),
                       "per_layer_median": [round(scale_of(r.detach()).median().item(), 2) for r in scale_params]}
    result = {
        "name": args.name, "seed": args.seed, "steps": args.steps,
        "accuracy": chosen["accuracy"], "density": chosen["density"], "chosen_step": chosen["step"],
        "per_layer": chosen["per_layer"], "final": checkpoints[-1], "checkpoints": checkpoints if len(checkpoints) > 1 else None,
        "sec_per_step_median": round(st[len(st) // 2], 4), "sec_per_step_mean": round(sum(st) / len(st), 4),
        "train_seconds": round(t_train, 1), "scale": scale_stats,
        "config": {k: v for k, v in vars(args).items() if k not in ("summarize", "out", "no_append", "threads")},
        "cmd": "python benchmarks/deft_research.py " + " ".join(sys.argv[1:]),
        "log": log,
    }
    return result


def neuron_selection(model, tok, blocks, rows, frac, max_length):
    """Per layer, a 0/1 mask of the `frac` least important neurons (mean |GELU(x)| * column norm of W_down)."""
    import torch

    from deftcompress.measurement.density import ActivationTap

    sums = [None] * len(blocks)
    count = [0]
    index = {id(b): i for i, b in enumerate(blocks)}
    state = {}

    def fn(block, pre, act):
        m = state["m"]
        v = (act.abs() * m).sum((0, 1))
        i = index[id(block)]
        sums[i] = v if sums[i] is None else sums[i] + v

    was = model.training
    model.eval()
    with ActivationTap(blocks, fn), torch.no_grad():
        for s in range(0, len(rows), 64):
            enc = tok([r["text_a"] for r in rows[s:s + 64]], truncation=True, max_length=max_length, padding=True,
                      return_tensors="pt")
            state["m"] = enc["attention_mask"].unsqueeze(-1).float()
            count[0] += int(enc["attention_mask"].sum())
            model(**enc)
    model.train(was)
    masks = []
    for b, v in zip(blocks, sums):
        w = getattr(b.down, "base_layer", b.down).weight  # [hidden, ffn]
        imp = v / count[0] * w.norm(dim=0)
        k = int(round(frac * imp.numel()))
        m = torch.zeros_like(imp)
        m[imp.argsort()[:k]] = 1.0
        masks.append(m)
    return masks


def summarize(path: Path) -> str:
    allrows = [json.loads(l) for l in path.read_text().splitlines() if l.strip()]
    rows = [r for r in allrows if r["accuracy"] is not None]
    timing = [r for r in allrows if r["accuracy"] is None]
    base = {}
    for r in rows:
        if r["config"]["loss"] == "none":
            base.setdefault(r["steps"], []).append(r)
    lines = ["# DEFT research runs (MiniLM-L6 + SST-2, 8k train rows, batch 32, LoRA r=8 on query/value/intermediate.dense)", "",
             "Produced by `python benchmarks/deft_research.py --summarize` from `benchmarks/results/deft_research.jsonl`.",
             "Density: exact-nonzero MLP activations over real tokens, all 872 dev rows. Cut and step-time ratio are against the",
             "mean of the PEFT (loss none) runs with the same step count. Step time: median seconds per training step on a",
             "shared 2-core CPU (noisy: colleagues were running tests).", "",
             "| # | name | seed | steps | accuracy | density | rel. cut | d acc (pts) | s/step | time ratio | command |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for i, r in enumerate(rows, 1):
        b = base.get(r["steps"], [])
        if b:
            bacc = sum(x["accuracy"] for x in b) / len(b)
            bden = sum(x["density"] for x in b) / len(b)
            bt = sum(x["sec_per_step_median"] for x in b) / len(b)
            cut = f"{100 * (1 - r['density'] / bden):.1f}%"
            dacc = f"{100 * (r['accuracy'] - bacc):+.1f}"
            tr = f"{r['sec_per_step_median'] / bt:.2f}"
        else:
            cut = dacc = tr = "n/a"
        cmd = r["cmd"].replace("|", "\\|")
        lines.append(f"| {i} | {r['name']} | {r['seed']} | {r['steps']} | {r['accuracy']:.4f} | {r['density']:.4f} | {cut} | "
                     f"{dacc} | {r['sec_per_step_median']:.3f} | {tr} | `{cmd}` |")
    # seed means per name
    lines += ["", "## Means over seeds (per variant name)", "", "| name | steps | seeds | accuracy | density | rel. cut | d acc (pts) | time ratio |",
              "|---|---|---|---|---|---|---|---|"]
    groups = {}
    for r in rows:
        groups.setdefault((r["name"], r["steps"]), []).append(r)
    for (name, steps), rs in groups.items():
        acc = sum(x["accuracy"] for x in rs) / len(rs)
        den = sum(x["density"] for x in rs) / len(rs)
        t = sum(x["sec_per_step_median"] for x in rs) / len(rs)
        b = base.get(steps, [])
        if b:
            bacc = sum(x["accuracy"] for x in b) / len(b)
            bden = sum(x["density"] for x in b) / len(b)
            bt = sum(x["sec_per_step_median"] for x in b) / len(b)
            extra = f"{100 * (1 - den / bden):.1f}% | {100 * (acc - bacc):+.1f} | {t / bt:.2f}"
        else:
            extra = "n/a | n/a | n/a"
        lines.append(f"| {name} | {steps} | {len(rs)} | {acc:.4f} | {den:.4f} | {extra} |")
    if timing:
        lines += ["", "## Step time (timing-only runs, no evaluation, run back to back)", "",
                  "| # | name | steps | median s/step | mean s/step | command |", "|---|---|---|---|---|---|"]
        for i, r in enumerate(timing, 1):
            cmd = r["cmd"].replace("|", "\\|")
            lines.append(f"| {i} | {r['name']} | {r['steps']} | {r['sec_per_step_median']:.3f} | {r['sec_per_step_mean']:.3f} | `{cmd}` |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.out)
    if args.summarize:
        md = summarize(out)
        dest = out.with_suffix(".md")
        notes = dest.with_name("deft_research_notes.md")
        if notes.exists():
            md += "\n" + notes.read_text()
        dest.write_text(md)
        print(md)
        return
    result = run(args)
    line = json.dumps(result)
    print(json.dumps({k: v for k, v in result.items() if k not in ("log", "config", "checkpoints")}))
    if not args.no_append:
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
