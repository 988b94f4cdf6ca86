"""How far a shared A moves after the first task: read from a run's per-stage checkpoints.

    python benchmarks/drift.py runs/table-minicoin-default/branchlora runs/table-minicoin-default/lilora ...
    python benchmarks/drift.py --tensor lora_B0 runs/table-minicoin-default/lilora    # LiLoRA's basis B0

For every adapted layer whose A is one tensor shared by all tasks (BranchLoRA's trunk, LiLoRA's A,
LiLoRA --share-a-only's A), A_k is that tensor after stage k. Printed per run: the relative change
from where task 1 left it, ||A_k - A_1||_F / ||A_1||_F over all layers together, after each stage;
then, after the last stage, the largest single layer's relative change and the range of the
layers' cosines cos(vec A_T, vec A_1). A run without a shared A is skipped with a line saying so.
"""

import argparse
from pathlib import Path

import torch

def shared_a(path: Path, tensor: str = "lora_A") -> dict:
    """The layers' `tensor` in a checkpoint; a ParameterList's entries end in .<name>.<k>: per task, not shared."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    return {k: v.float() for k, v in state["adapters"].items() if k.endswith("." + tensor)}


def drift(run: Path, tensor: str = "lora_A") -> dict | None:
    """{"stages": [relative change of all layers together after stage 2..T], "max_layer", "cos"}."""
    ckpts = sorted((run / "checkpoints").glob("after_stage_*.pt"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))
    if not ckpts:
        raise SystemExit(f"{run}: no checkpoints/after_stage_<k>.pt (is this a run folder?)")
    first = shared_a(ckpts[0], tensor)
    if not first:
        return None
    ref = torch.cat([v.flatten() for v in first.values()])
    stages, last = [], first
    for path in ckpts[1:]:
        last = shared_a(path, tensor)
        now = torch.cat([last[k].flatten() for k in first])
        stages.append(((now - ref).norm() / ref.norm()).item())
    per_layer = [((last[k] - v).norm() / v.norm()).item() for k, v in first.items()]
    cos = [torch.nn.functional.cosine_similarity(last[k].flatten(), v.flatten(), dim=0).item()
           for k, v in first.items()]
    return {"stages": stages, "max_layer": max(per_layer), "cos": (min(cos), max(cos)), "layers": len(first)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", type=Path, nargs="+")
    p.add_argument("--tensor", default="lora_A", help="the shared tensor's name in each layer (lora_A; LiLoRA's "
                                                      "basis: lora_B0)")
    args = p.parse_args()
    for run in args.runs:
        d = drift(run, args.tensor)
        if d is None:
            print(f"{run}: no shared {args.tensor}")
            continue
        steps = " ".join(f"{v:.2f}" for v in d["stages"])
        print(f"{run}: ||X_k - X_1|| / ||X_1|| of {args.tensor} after stages 2..{len(d['stages']) + 1}: {steps}; after "
              f"the last, largest layer {d['max_layer']:.2f}, cos(X_T, X_1) {d['cos'][0]:.2f}-{d['cos'][1]:.2f} "
              f"({d['layers']} layers)")


if __name__ == "__main__":
    main()
