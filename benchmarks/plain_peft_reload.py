"""Score a DEFT run's adapter loaded by plain peft onto the original checkpoint, without importing deftcompress.

    python benchmarks/plain_peft_reload.py runs/deft_vs_peft/lora_deft_s1_ep1_sel --data-dir ../shared/data

Reads the run's report (which adapter folder plain peft loads: `details.plain_peft.dir` of the DEFT
step) and recipe (task, max_seq_length), loads `PeftModel.from_pretrained(base, dir)` with the base
named in the adapter's config, and scores the GLUE dev rows the run scored, with its own TSV reader
and tokenisation. Prints one JSON line: the correct count against the report's, and the difference in
examples (the issue's bound: at most one). `--make` first writes the plain-peft form for runs made
before it existed (this step imports deftcompress, in a separate process; the check never does).
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from pathlib import Path

FIELDS = {"glue/sst2": (("sentence",), "label"), "glue/mrpc": (("#1 String", "#2 String"), "Quality")}

MAKE = """
import json, sys
from pathlib import Path
from deftcompress.architecture import mlp_blocks
from deftcompress.data.tasks import get_task
from deftcompress.models.loading import load_model_and_tokenizer
from deftcompress.peft_methods.plain_peft import PLAIN_PEFT_DIR, save_plain_peft_adapter
from deftcompress.peft_methods.saving import load_adapter_into
run, base_ref, task = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
base, _, arch = load_model_and_tokenizer(base_ref, get_task(task))
model = load_adapter_into(base, run / "passes/01_deft/adapter", "peft")  # scales folded into the base first
names = [b.names[p] for b in mlp_blocks(model.get_base_model(), arch) for p in ("up", "down")]
print(json.dumps(save_plain_peft_adapter(model, run / "passes/01_deft" / PLAIN_PEFT_DIR, names)))
"""


def read_rows(path: Path, task: str) -> list[tuple[tuple[str, ...], int]]:
    columns, label = FIELDS[task]
    with open(path, encoding="utf-8-sig", newline="") as f:  # GLUE TSVs: bare quotes, MRPC starts with a BOM
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    head = rows[0]
    return [(tuple(r[head.index(c)] for c in columns), int(r[head.index(label)])) for r in rows[1:] if r]


def check(run: Path, data_dir: Path, made: dict | None = None) -> dict:
    import torch
    import yaml
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    report = json.loads((run / "report.json").read_text())
    recipe = yaml.safe_load((run / "recipe.resolved.yaml").read_text())
    step = next(s for s in report["steps"] if s["pass"] == "deft")
    plain = made or step["details"]["plain_peft"]
    adapter = run / plain["dir"]
    base_ref = json.loads(next(adapter.glob("*adapter_config.json")).read_text())["base_model_name_or_path"]
    task = recipe["task"]
    rows = read_rows(data_dir / task / "dev.tsv", task)[:recipe.get("max_eval_samples") or None]
    tokenizer = AutoTokenizer.from_pretrained(base_ref)
    model = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(base_ref, num_labels=2),
                                      str(adapter)).eval()
    correct, predictions = 0, []
    with torch.no_grad():
        for i in range(0, len(rows), 64):
            batch = rows[i:i + 64]
            texts = list(zip(*[r[0] for r in batch]))
            enc = tokenizer(*texts, truncation=True, max_length=recipe["max_seq_length"], padding=True, return_tensors="pt")
            predicted = model(**enc).logits.argmax(-1).tolist()
            predictions += predicted
            correct += sum(int(p == r[1]) for p, r in zip(predicted, batch))
    assert not any(m.startswith("deftcompress") for m in sys.modules), "the check must not use deftcompress"
    reported = round(step["metrics"]["accuracy"] * step["eval_examples"])
    out = {"run": run.name, "adapter": plain["dir"], "bytes": plain.get("bytes"), "rows": len(rows),
           "correct_plain_peft": correct, "correct_reported": reported, "difference_examples": correct - reported,
           "within_one_example": abs(correct - reported) <= 1}
    if task == "glue/mrpc":
        tp = sum(1 for p, r in zip(predictions, rows) if p == 1 and r[1] == 1)
        fp = sum(1 for p, r in zip(predictions, rows) if p == 1 and r[1] == 0)
        fn = sum(1 for p, r in zip(predictions, rows) if p == 0 and r[1] == 1)
        out.update(f1_plain_peft=round(2 * tp / max(2 * tp + fp + fn, 1), 4), f1_reported=step["metrics"].get("f1"))
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run")
    p.add_argument("--data-dir", default="../shared/data")
    p.add_argument("--make", action="store_true", help="write the plain-peft form first (runs made before it existed)")
    p.add_argument("--log", default=None, help="also append the result (with this command) to this JSON Lines file, "
                                               "e.g. benchmarks/results/plain_peft_reload.jsonl")
    p.add_argument("--adapter", default=None, help="score this adapter folder of the run instead (e.g. passes/01_deft/adapter, "
                                                   "the library form, to see what plain peft makes of it)")
    args = p.parse_args(argv)
    run = Path(args.run)
    made = None
    if args.make:
        import yaml

        task = yaml.safe_load((run / "recipe.resolved.yaml").read_text())["task"]
        base_ref = json.loads(next((run / "passes/01_deft/adapter").glob("*adapter_config.json")).read_text())[
            "base_model_name_or_path"]
        proc = subprocess.run([sys.executable, "-c", MAKE, str(run), base_ref, task], capture_output=True, text=True)
        if proc.returncode:
            sys.exit(proc.stderr[-2000:])
        made = {**json.loads(proc.stdout.strip().splitlines()[-1]), "dir": "passes/01_deft/adapter_plain_peft",
                "made_after_the_run": True}
    if args.adapter:
        made = {"dir": args.adapter}
    result = {**check(run, Path(args.data_dir), made), **({"made_after_the_run": True} if args.make else {}),
              "cmd": "python benchmarks/plain_peft_reload.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    print(json.dumps(result))
    if args.log:
        with open(args.log, "a") as f:
            f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
