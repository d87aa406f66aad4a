"""Relufication on the Llama family: a SiLU decoder's exact density and perplexity, before and after.

    DEFTCOMPRESS_DATA_DIR=../shared/data python benchmarks/relufy_llama.py

No pretrained Llama-family weights can be fetched on this machine, so the script first makes a small
one: a Llama-style decoder (hidden 128, 4 layers, gated MLP 512 wide, SiLU, a 4,096-token BPE
vocabulary trained on the same text) trained from scratch as a causal LM on the first 50,000 SST-2
training sentences, saved as a safetensors checkpoint. Then, through deftcompress recipes on the rest
of the training sentences (its held-out part for selection) and scored on all SST-2 dev sentences
(perplexity over real tokens; reported only):

- SiLU as trained, and SiLU + DEFT with the pass defaults (what a user tries first): exact density;
- relufy (ReLU on the gate's activation), before and after LoRA fine-tuning without a density loss;
- relufy + DEFT at density targets (the density loss pushes gate pre-activations below zero);
- shifted ReLU (FATReLU) + DEFT.

A toy model, not a 135M-parameter decoder: the figures show the mechanism on this family (SiLU never
reaches an exact zero; the gate's ReLU does, and DEFT lowers it further), not what a large model pays.
Writes results/relufy_llama.{json,md}; run folders under runs/relufy_llama/.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

PRETRAIN_SENTENCES = 50_000


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pretrain-steps", type=int, default=1500)
    p.add_argument("--deft-steps", type=int, default=400)
    p.add_argument("--targets", default="0.15,0.05", help="relufy + DEFT density targets")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work", default="runs/relufy_llama", help="checkpoint, data files and run folders")
    p.add_argument("--out", default=str(HERE / "results" / "relufy_llama"))
    return p.parse_args(argv)


def sst2_sentences():
    from deftcompress.data.tasks import get_task, load_examples

    task = get_task("glue/sst2")
    train = [r["text_a"] for r in load_examples(task, "train")]
    dev = [r["text_a"] for r in load_examples(task, "validation")]
    return train, dev


def make_checkpoint(torch, folder: Path, sentences: list[str], steps: int) -> dict:
    """Train the tokenizer and the SiLU decoder from scratch; save both to `folder` (safetensors)."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers, processors

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(sentences, trainers.BpeTrainer(vocab_size=4096, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                     pad_token="<pad>", unk_token="<unk>")
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=512,
                                      num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=128, hidden_act="silu", pad_token_id=0,
                                      bos_token_id=1, eos_token_id=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps, pct_start=0.05)
    generator = torch.Generator().manual_seed(0)
    losses, start = [], time.perf_counter()
    model.train()
    for step in range(steps):
        rows = [sentences[i] for i in torch.randint(len(sentences), (32,), generator=generator).tolist()]
        batch = tokenizer(rows, padding=True, truncation=True, max_length=64, return_tensors="pt")
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(**batch, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        losses.append(float(loss))
        if step % 100 == 0 or step == steps - 1:
            print(f"pretraining step {step}: loss {sum(losses[-50:]) / len(losses[-50:]):.3f}", flush=True)
    model.eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return {"steps": steps, "final_train_loss": round(sum(losses[-50:]) / len(losses[-50:]), 4),
            "seconds": round(time.perf_counter() - start, 1),
            "parameters": sum(p.numel() for p in model.parameters())}


def write_jsonl(path: Path, texts: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))


def main(argv=None) -> None:
    import torch

    from deftcompress import Recipe, run_recipe

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    train, dev = sst2_sentences()
    checkpoint = work / "checkpoint"
    if (checkpoint / "model.safetensors").is_file():
        made = json.loads((work / "checkpoint_made.json").read_text())
    else:
        made = make_checkpoint(torch, checkpoint, train[:PRETRAIN_SENTENCES], args.pretrain_steps)
        (work / "checkpoint_made.json").write_text(json.dumps(made))
    write_jsonl(work / "data" / "train.jsonl", train[PRETRAIN_SENTENCES:])  # DEFT's data: not seen in pretraining
    write_jsonl(work / "data" / "dev.jsonl", dev)
    task = {"type": "language_modeling", "train": str(work / "data" / "train.jsonl"),
            "validation": str(work / "data" / "dev.jsonl"), "text": "text", "name": "sst2-sentences-lm"}
    train_settings = {"method": "lora", "r": 8, "lora_alpha": 16, "max_steps": args.deft_steps, "batch_size": 32,
                      "learning_rate": 2e-3, "warmup_ratio": 0.06, "validation_fraction": 0.05,
                      "eval_steps": max(args.deft_steps // 4, 1)}
    variants = [("silu", "SiLU + DEFT (pass defaults)", [{"deft": dict(train_settings)}]),
                ("relu_lora", "ReLU, then LoRA without density loss",
                 [{"relufy": {"activation": "relu"}}, {"deft": {**train_settings, "density_weight": 0.0}}])]
    for target in (float(t) for t in args.targets.split(",")):
        variants.append((f"relu_deft_{target:g}", f"ReLU, then DEFT (target {target:g})",
                         [{"relufy": {"activation": "relu"}}, {"deft": {**train_settings, "density_target": target}}]))
    variants.append(("shifted_deft", "shifted ReLU (t=0.05), then DEFT (target 0.05)",
                     [{"relufy": {"activation": "shifted_relu", "threshold": 0.05}},
                      {"deft": {**train_settings, "density_target": 0.05}}]))
    rows = []
    for name, label, passes in variants:
        recipe = Recipe.build(name=f"relufy_llama_{name}", model=str(checkpoint), task=task, seed=0,
                              max_eval_samples=None, eval_batch_size=32, passes=passes)
        report = run_recipe(recipe, output_dir=work / name, quiet=True)
        for step in report.steps:
            if name != "silu" and step.index == 0:
                continue  # the base model is the same in every run: listed once
            rows.append({"variant": label, "run": name, "step": step.index, "pass": step.pass_name,
                         "perplexity": step.task_score, "density": step.density.get("decoder")})
            print(f"{label} / step {step.index} {step.pass_name}: perplexity {step.task_score:.2f}, "
                  f"density {rows[-1]['density']}", flush=True)
    data = {"command": "DEFTCOMPRESS_DATA_DIR=../shared/data python benchmarks/relufy_llama.py " + " ".join(sys.argv[1:]),
            "checkpoint": made, "deft": train_settings, "dev_sentences": len(dev),
            "deft_train_sentences": len(train) - PRETRAIN_SENTENCES, "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(data, indent=1) + "\n")
    lines = ["# Relufication on a Llama-style decoder (SiLU, trained here from scratch)", "",
             f"Produced by `{data['command']}`. Model: {made['parameters']:,} parameters, {made['steps']} pretraining "
             f"steps on {PRETRAIN_SENTENCES:,} SST-2 training sentences (final train loss {made['final_train_loss']}). "
             f"Fine-tuning: {data['deft_train_sentences']:,} other training sentences, LoRA r 8 on the attention and MLP "
             f"projections, {args.deft_steps} steps of 32; perplexity over the real tokens of all {len(dev)} SST-2 dev "
             "sentences (never used for training or selection); density = exact-nonzero fraction of the gate "
             "activations (the product with the up-projection is zero wherever they are).", "",
             "| variant | step | pass | perplexity | exact density |", "|---|---|---|---|---|"]
    for r in rows:
        d = "-" if r["density"] is None else f"{r['density']:.4f}"
        lines.append(f"| {r['variant'] if r['step'] else 'SiLU as trained (base)'} | {r['step']} | {r['pass']} | "
                     f"{r['perplexity']:.2f} | {d} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
