"""Denoising networks: DDPM-style U-Net and DiT, both `net(x, noise_labels, class_labels=None)`."""

from diffctl.networks.dit import DiT
from diffctl.networks.embeddings import ClassEmbedding, NoiseLevelEmbedding, sinusoidal_embedding
from diffctl.networks.unet import UNet

__all__ = ["UNet", "DiT", "ClassEmbedding", "NoiseLevelEmbedding", "sinusoidal_embedding"]
