"""Per-device training memory of DDP against FSDP (trainer.strategy=fsdp) for DiT-XL/2.

The network is the one `diffctl train model=dit model.size=XL model.patch_size=2` builds (conf/model/dit.yaml),
on ImageNet-256 latents as in the DiT paper (4 x 32 x 32, 1000 classes, learned sigma: 8 output channels),
built on the meta device (shapes only, nothing allocated). Per device, in float32 (trainer.precision=32-true):

- model state: weights, gradients, Adam's two moments and the EMA copy (4 bytes each per parameter).
  DDP holds all of it on every device. FSDP (diffctl.sharding: one unit per DiffusionModel and per DiT block,
  use_orig_params=False) holds 1/N of each unit's flat parameter, padded to a multiple of N, counted here
  from the real module with the same wrap rule;
- FSDP's gathered units: the full weights of a unit while it runs, and its full gradient until it is
  reduce-scattered. With FSDP's default backward prefetch two units can be gathered at once, so this
  counts 2 x (largest unit's weights) + 1 x (its gradient);
- activations: the bytes autograd saves for backward in one forward at the per-device batch, measured on
  the meta device (distinct storages, parameters excluded); the same under both strategies.

    python scripts/bench_memory.py --out scripts/results/bench_memory.json
    python scripts/bench_memory.py --quick    # DiT-S/2 at batch 2: seconds
"""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path

import torch
from benchlib import environment, write_json

MIB = 2**20


def build(size: str, batch: int):
    """(network on meta, shape, num_classes) from diffctl's own DiT config."""
    from diffctl.build import instantiate_config
    from diffctl.config import compose_config

    cfg = compose_config("train", ["model=dit", f"model.size={size}", "model.patch_size=2", "model.out_channels=8"],
                         tempfile.mkdtemp())
    with torch.device("meta"):
        net = instantiate_config(cfg.model, "model", in_channels=4, resolution=32, num_classes=1000)
    return net, (4, 32, 32), 1000


def fsdp_units(net: torch.nn.Module) -> list[int]:
    """Parameter count of each FSDP unit diffctl's wrap rule makes of a DiffusionModel around `net`: each
    block class instance owns its parameters not inside a nested one; the rest belongs to the DiffusionModel."""
    from diffctl.sharding import block_classes

    classes = tuple(c for c in block_classes() if c.__name__ != "DiffusionModel")
    units, owned = [], set()
    for module in net.modules():
        if isinstance(module, classes):
            params = [p for p in module.parameters() if id(p) not in owned]
            owned.update(id(p) for p in params)
            units.append(sum(p.numel() for p in params))
    units.append(sum(p.numel() for p in net.parameters() if id(p) not in owned))  # the DiffusionModel's own unit
    return units


def saved_activation_bytes(net: torch.nn.Module, batch: int, shape, num_classes: int) -> int:
    """Bytes autograd keeps for backward in one training forward on meta (distinct storages; the
    parameters themselves, which autograd also references, are not activations)."""
    params = {p.untyped_storage()._cdata for p in net.parameters()}
    sizes: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage._cdata not in params:
            sizes[storage._cdata] = storage.nbytes()
        return t

    x = torch.empty((batch, *shape), device="meta")
    t = torch.empty((batch,), device="meta")
    y = torch.zeros((batch,), dtype=torch.long, device="meta")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        net(x, t, y).float().square().mean()
    return sum(sizes.values())


def per_device(units: list[int], world: int, strategy: str, activations: int) -> dict[str, float]:
    copies = 5  # weights, gradients, exp_avg, exp_avg_sq and the EMA, 4 bytes each
    if strategy == "ddp":
        state, gathered = 4 * copies * sum(units), 0
    else:
        shard = sum(math.ceil(n / world) for n in units)  # each flat parameter padded to a multiple of N
        state = 4 * copies * shard
        gathered = 0 if world == 1 else 4 * 3 * max(units)  # 2 units' weights (prefetch) + 1 unit's gradient
    return {
        "model_state_mib": round(state / MIB, 1),
        "gathered_units_mib": round(gathered / MIB, 1),
        "activations_mib": round(activations / MIB, 1),
        "total_mib": round((state + gathered + activations) / MIB, 1),
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="XL", help="DiT size S | B | L | XL (patch size 2)")
    p.add_argument("--batch", type=int, default=32, help="images per device (DiT paper: 256 over 8 devices)")
    p.add_argument("--worlds", default="1,2,8", help="world sizes (devices)")
    p.add_argument("--quick", action="store_true", help="DiT-S/2 at batch 2")
    p.add_argument("--out", help="JSON report (never overwritten)")
    args = p.parse_args(argv)
    if args.quick:
        args.size, args.batch = "S", 2
    if args.out and Path(args.out).exists():
        p.error(f"{args.out} exists; results are never overwritten")
    net, shape, k = build(args.size, args.batch)
    units = fsdp_units(net)
    activations = saved_activation_bytes(net, args.batch, shape, k)
    rows = []
    for world in (int(w) for w in args.worlds.split(",")):
        for strategy in ("ddp", "fsdp"):
            rows.append({"strategy": strategy, "world_size": world, **per_device(units, world, strategy, activations)})
    report = {
        "model": f"DiT-{args.size}/2", "params": sum(units), "fsdp_units": len(units), "largest_unit_params": max(units),
        "batch_per_device": args.batch, "precision": "32-true", "rows": rows, "environment": environment(),
    }
    print(f"{report['model']}: {report['params'] / 1e6:.1f} M parameters in {len(units)} FSDP units "
          f"(largest {max(units) / 1e6:.2f} M); per device at batch {args.batch}, MiB:")
    print(f"{'strategy':8} {'N':>3} {'state':>9} {'gathered':>9} {'activ.':>9} {'total':>9}")
    for r in rows:
        print(f"{r['strategy']:8} {r['world_size']:>3} {r['model_state_mib']:>9} {r['gathered_units_mib']:>9} "
              f"{r['activations_mib']:>9} {r['total_mib']:>9}")
    if args.out:
        write_json(report, args.out)
    return report


if __name__ == "__main__":
    main()
