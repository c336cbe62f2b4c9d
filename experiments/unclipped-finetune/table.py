"""Markdown table of every candidate's gains.json (PTQ and fine-tuned PSNR vs the teacher per
seed, the gain, the final trajectory drift of each student from error_by_timestep.json).
    python3 experiments/unclipped-finetune/table.py"""
import glob, json, os

here = os.path.dirname(os.path.abspath(__file__))
print("| candidate | --set | PTQ dB (seeds 0/1/2) | fine-tuned dB | gain dB | min gain | end drift PTQ -> FT (seed 0/1/2) |")
print("|---|---|---|---|---|---|---|")
for f in sorted(glob.glob(f"{here}/*/gains.json"), key=os.path.getmtime):
    g = json.load(open(f))
    name = os.path.basename(os.path.dirname(f))
    fmt = lambda xs: " / ".join(f"{x:.2f}" for x in xs)
    drifts = []
    for r in g["runs"]:
        e = json.load(open(f"{os.path.dirname(f)}/seed{r['seed']}/error_by_timestep.json"))
        d = {s["name"]: s["drift"][-1] for s in e["students"]}
        drifts.append(f"{d['ptq']:.4f} -> {d['finetuned']:.4f}")
    print(f"| {name} | `{g['sets'] or '(none)'}` | {fmt(r['ptq_psnr'] for r in g['runs'])} | "
          f"{fmt(r['finetuned_psnr'] for r in g['runs'])} | {fmt(g['gain_db'])} | {g['gain_min_db']:.2f} | "
          f"{', '.join(drifts)} |")
