"""What `diffctl train-autoencoder` reports on a held-out split with the EMA autoencoder:

- reconstruction quality of the posterior mean, decoded and saved as 8-bit images: PSNR and SSIM
  (torchmetrics, data range 2, per-image mean as diffctl/img2img_report.py), and rFID/KID of the
  reconstructions against the originals (diffctl.metrics with the originals in memory as the
  reference; report.rfid=false skips it). rFID is the floor a latent diffusion model on this
  autoencoder cannot beat.
- the VAE's ELBO in bits/dim (the autoencoder is a generative model: z ~ N(0, I), x ~ p(x | z)).
  The decoder likelihood is the one the training loss fits: Laplace(x'; b = exp(logvar)) per pixel for
  reconstruction=l1 (the loss |x - x'| / b + log b is its NLL less log 2), Normal(x'; var = exp(logvar))
  for l2 (its NLL's minimiser in logvar is the loss's). With one posterior draw z per image (keyed
  noise) and uniform dequantization of the 8-bit data, bits/dim = (-log p(x~ | z) + KL(q(z|x) || N(0, I)))
  / (D ln 2) + 7, the convention of `diffctl likelihood` (diffctl/ode_likelihood.py); an upper bound,
  in expectation, on the discrete NLL. With an LPIPS or adversarial term the learned logvar also
  absorbs those terms, so the bound is looser (the report says so).
- the same bound with the decoder's scale fitted to these images (maximum likelihood, one scalar),
  beside the learned logvar's: the learned one starts at 0 and short runs leave it far from converged;
- the latent statistics (std of z ~ q(z | x)) and LDM's scale factor 1/std, which the export stores
  as its scaling_factor;
- prior samples: decodes of z ~ N(0, I) (a VAE's own samples; blurry for small KL weights, since the
  posterior then barely matches the prior), and a grid of inputs above their reconstructions.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from diffctl.conditioning import IMAGE
from diffctl.console import JobProgress
from diffctl.files import atomic_write
from diffctl.images import save_grid, to_uint8
from diffctl.noise import normals
from diffctl.ode_likelihood import DEQUANT_OFFSET_BITS
from diffctl.rng import mix_seed

DATA_RANGE = 2.0  # pixels in [-1, 1]
GRID_IMAGES = 16  # inputs (and their reconstructions) shown in reconstructions.png
POSTERIOR, DEQUANT, PRIOR = 0, 1, 2  # keyed streams of the report's draws


def decoder_nll(x: Tensor, recon: Tensor, logvar: float, reconstruction: str) -> Tensor:
    """-log p(x | z) in nats per image [N], summed over pixels: Laplace(recon, b = exp(logvar)) for l1,
    Normal(recon, var = exp(logvar)) for l2."""
    d = (x - recon).double()
    if reconstruction == "l1":
        b = math.exp(logvar)
        terms = d.abs() / b + math.log(2.0 * b)
    else:
        terms = 0.5 * (d.square() / math.exp(logvar) + logvar + math.log(2.0 * math.pi))
    return terms.flatten(1).sum(1)


def dequantize(x: Tensor, key: int, rows: Tensor) -> Tensor:
    """8-bit images k/127.5 - 1 -> (k + u)/128 - 1 with u ~ U[0, 1) keyed by (key, image index)."""
    k = torch.round((x.double() + 1) * 127.5)
    u = 0.5 * torch.erfc(-normals(key, rows, 0, tuple(x.shape[1:])).double() / math.sqrt(2.0))  # Phi(normal)
    return ((k + u.to(x.device)) / 128 - 1).to(x.dtype)


def _quantized(x: Tensor) -> Tensor:
    """Images as saved: 8-bit, back in [-1, 1] (NCHW float)."""
    return to_uint8(x).permute(0, 3, 1, 2).float() / 127.5 - 1.0


@torch.no_grad()
def autoencoder_report(autoencoder, dataset: Dataset, report, device, logvar: float, reconstruction: str,
                       perceptual_or_adversarial: bool = False, metrics_cfg=None, data_cfg=None,
                       progress: bool = True) -> dict[str, Any]:  # fmt: skip
    """The report (a dict) of `autoencoder` on `dataset` (image batches in [-1, 1]); report: the config's
    report node; metrics_cfg/data_cfg: the metrics and data nodes rFID uses (None: no rFID)."""
    import torchmetrics.functional.image as tm

    n = min(int(report["num_images"]), len(dataset))
    loader = DataLoader(Subset(dataset, range(n)), batch_size=int(report["batch_size"]), shuffle=False)
    autoencoder = autoencoder.to(device).eval()
    seed = int(report["seed"])
    originals, recons = [], []
    psnr = ssim = nll = kl = 0.0
    z_sum = z_sq = abs_sum = sq_sum = 0.0
    z_count, seen, dim = 0, 0, None
    with JobProgress(progress) as bar:
        task = bar.add_task("autoencoder report: encoding and decoding the held-out images", total=n)
        for batch in loader:
            x = batch[IMAGE].to(device)
            rows = torch.arange(seen, seen + len(x), dtype=torch.int64)
            posterior = autoencoder.encode(x)
            recon = autoencoder.decode(posterior.mode())
            saved = _quantized(recon)
            a, b = saved.double(), x.double().cpu()
            psnr += float(tm.peak_signal_noise_ratio(a, b, data_range=DATA_RANGE, reduction="none", dim=(1, 2, 3)).sum())
            ssim += float(tm.structural_similarity_index_measure(a, b, data_range=DATA_RANGE, reduction="none").sum())
            z = posterior.sample(noise=normals(mix_seed(seed, POSTERIOR), rows, 0, tuple(posterior.shape[1:])).to(device, x.dtype))
            drawn = autoencoder.decode(z)
            dequantized = dequantize(x, mix_seed(seed, DEQUANT), rows)
            nll += float(decoder_nll(dequantized, drawn, logvar, reconstruction).sum())
            residual = (dequantized - drawn).double()
            abs_sum, sq_sum = abs_sum + float(residual.abs().sum()), sq_sum + float(residual.square().sum())
            kl += float(posterior.kl().double().sum())
            z_sum, z_sq, z_count = z_sum + float(z.double().sum()), z_sq + float(z.double().square().sum()), z_count + z.numel()
            originals.append(x.cpu())
            recons.append(saved)
            dim, seen = x[0].numel(), seen + len(x)
            bar.advance(task, len(x))
    z_mean = z_sum / z_count
    z_std = math.sqrt(max(z_sq / z_count - z_mean**2, 0.0))
    to_bits = 1.0 / (dim * math.log(2.0))
    out: dict[str, Any] = {
        "split": report["split"], "num_images": seen, "image_shape": list(originals[0].shape[1:]),
        "latent_shape": list(autoencoder.latent_shape(*originals[0].shape[1:])),
        "psnr": psnr / seen, "ssim": ssim / seen,
        "elbo_bits_per_dim": (nll + kl) / seen * to_bits + DEQUANT_OFFSET_BITS,
        "reconstruction_bits_per_dim": nll / seen * to_bits + DEQUANT_OFFSET_BITS, "kl_bits_per_dim": kl / seen * to_bits,
        "decoder": f"{'Laplace(b' if reconstruction == 'l1' else 'Normal(var'} = exp({logvar:.4f}))",
        **_fitted_scale(reconstruction, abs_sum, sq_sum, seen * dim, kl / seen * to_bits),
        "latent_mean": z_mean, "latent_std": z_std, "scale_factor": 1.0 / z_std if z_std > 0 else None,
    }  # fmt: skip
    notes = []
    if perceptual_or_adversarial:
        notes.append("the loss had an LPIPS or adversarial term, which the learned logvar absorbs: the ELBO is looser")
    images, recons_t = torch.cat(originals), torch.cat(recons)
    if metrics_cfg is not None and report.get("rfid", True):
        out.update(_rfid(recons_t, images, metrics_cfg, data_cfg, device, notes))
    if notes:
        out["notes"] = "; ".join(notes)
    latent = autoencoder.latent_shape(*images.shape[1:])
    k = int(report["prior_samples"])
    prior = normals(mix_seed(seed, PRIOR), torch.arange(k, dtype=torch.int64), 0, latent).to(device) if k else None
    out["_images"] = {"inputs": images[:GRID_IMAGES], "reconstructions": recons_t[:GRID_IMAGES],
                      "prior": autoencoder.decode(prior).clamp(-1, 1).cpu() if k else None}  # fmt: skip
    return out


def _fitted_scale(reconstruction: str, abs_sum: float, sq_sum: float, pixels: int, kl_bits: float) -> dict[str, Any]:
    """The ELBO with the decoder's one scale parameter set to its maximum-likelihood value on these images
    (b = mean |x~ - x'| for Laplace, var = mean (x~ - x')^2 for Normal) instead of the learned logvar,
    which starts at 0 and moves slowly: what the bound would be once that one scalar has converged.
    Fitted on the images it scores, so optimistic, but by one parameter over all their pixels."""
    if reconstruction == "l1":
        scale = abs_sum / pixels
        nats, decoder = 1.0 + math.log(2.0 * scale), f"Laplace(b = {scale:.5g})"
    else:
        scale = sq_sum / pixels
        nats, decoder = 0.5 * (1.0 + math.log(2.0 * math.pi * scale)), f"Normal(var = {scale:.5g})"
    return {"elbo_bits_per_dim_fitted_scale": nats / math.log(2.0) + DEQUANT_OFFSET_BITS + kl_bits, "fitted_decoder": decoder}


def _rfid(recons: Tensor, images: Tensor, metrics_cfg, data_cfg, device, notes: list[str]) -> dict[str, Any]:
    """FID (and KID) of the reconstructions against the originals: as `diffctl metrics`, the originals in memory."""
    from diffctl.metrics import MetricsUnavailable, evaluate
    from diffctl.references import InMemory

    cfg = OmegaConf.merge(metrics_cfg, {"names": ["fid", "kid"], "fid_min_samples": 0, "ref": None})
    uint8 = ((recons + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    try:
        scores = evaluate(uint8, cfg, data_cfg, torch.device(device), ref=InMemory(f"the {len(images)} originals", images))
    except MetricsUnavailable as err:
        notes.append(f"no rFID: {err}")
        return {"rfid": None}
    if len(images) < 2048:
        notes.append(f"rFID from {len(images)} images (biased upward below 2048; compare at equal counts)")
    return {"rfid": scores.get("fid"), "rkid": scores.get("kid_mean"), "rfid_detector": scores.get("detector")}


def write_report(report: dict[str, Any], run_dir: Path) -> dict[str, Path]:
    """autoencoder_report.json, reconstructions.png (inputs above reconstructions) and prior_samples.png."""
    paths = {"report": run_dir / "autoencoder_report.json", "reconstructions": run_dir / "reconstructions.png"}
    images = report.get("_images", {})
    text = json.dumps({k: v for k, v in report.items() if k != "_images"}, indent=2) + "\n"
    atomic_write(paths["report"], lambda f: f.write(text.encode()))
    inputs, recons = images["inputs"], images["reconstructions"]
    per_row = max(1, min(8, len(inputs)))
    rows = []
    for i in range(0, len(inputs), per_row):  # a row of inputs, then the same images reconstructed
        rows += [inputs[i : i + per_row], recons[i : i + per_row]]
    save_grid(to_uint8(torch.cat(rows)), paths["reconstructions"], nrow=per_row)
    if images.get("prior") is not None:
        paths["prior samples"] = run_dir / "prior_samples.png"
        save_grid(to_uint8(images["prior"]), paths["prior samples"])
    return paths


def print_report(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"autoencoder on the {report['split']} split ({report['num_images']} images)", show_header=False)
    table.add_column()
    table.add_column(justify="right")
    shape = "x".join(map(str, report["image_shape"])), "x".join(map(str, report["latent_shape"]))
    table.add_row("images -> latents", f"{shape[0]} -> {shape[1]}")
    table.add_row("PSNR (dB)", f"{report['psnr']:.2f}")
    table.add_row("SSIM", f"{report['ssim']:.4f}")
    if report.get("rfid") is not None:
        table.add_row(f"rFID ({report.get('rfid_detector')})", f"{report['rfid']:.3f}")
    if report.get("rkid") is not None:
        table.add_row("rKID", f"{report['rkid']:.5f}")
    table.add_row("ELBO bits/dim", f"{report['elbo_bits_per_dim']:.4f}")
    table.add_row("  reconstruction + KL", f"{report['reconstruction_bits_per_dim']:.4f} + {report['kl_bits_per_dim']:.4f}")
    table.add_row("decoder", report["decoder"])
    table.add_row("ELBO bits/dim, decoder scale fitted here", f"{report['elbo_bits_per_dim_fitted_scale']:.4f}")
    table.add_row("  fitted decoder", report["fitted_decoder"])
    table.add_row("latent std (scale factor)", f"{report['latent_std']:.4f} ({report['scale_factor'] or float('nan'):.4f})")
    Console().print(table)
    if report.get("notes"):
        print(f"note: {report['notes']}")
