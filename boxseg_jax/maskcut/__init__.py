"""CutLER MaskCut in JAX: DINO ViT features, batched Normalized Cut, CLI.

Modules (see docs/maskcut.md):
  vit         DINO ViT-S/16, S/8, B/16, B/8 in Flax (last-block key features).
  ncut        graph, Fiedler vector (dense eigh | LOBPCG), foreground rule,
              jnp flood fill; pure jnp, one image.
  maskcut     the N-mask loop for one image, vmapped over a batch.
  crf         host post-processing (optional DenseCRF, fill holes, resize).
  dataset_io  image lists (glob | coco:ROOT:SPLIT), resizing, COCO JSON.
  generate    weights + one jitted batch function + COCO output.
  reference   NumPy/SciPy port of the reference, for tests and benchmarks.

`python -m boxseg_jax.maskcut --images=... --output=FILE.json --weights=...`
"""
