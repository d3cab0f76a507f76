"""Query layer: latent stores and a nearest-neighbour index (faiss) over cell and niche latents."""
