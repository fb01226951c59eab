"""ldm: latent diffusion — KL-VAE, latent cache, cross-attention U-Net, ControlNet and samplers."""
