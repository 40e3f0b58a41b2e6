r"""MaskCut pseudo masks (CutLER's label-free path), the documented run.

Command (DINO weights from the official release, read without torch):

  python -m boxseg_jax.maskcut --config=configs/maskcut.py \
      --images=coco:../shared/data/coco-mini:val2017 \
      --weights=dino_vitbase8_pretrain.pth --output=/tmp/maskcut_val.json

Defaults are the README / released-file setting of CutLER (reference §5.1):
ViT-B/8 keys, 480 x 480 input (60 x 60 patches), tau 0.15, N = 3 masks,
DenseCRF post-processing when pydensecrf is installed (skipped with a
warning otherwise, recorded in the JSON's `info`). `arg` picks variants, comma separated: an arch
(`vit_small16`, `vit_small8`, `vit_base16`, `vit_base8`), a solver (`eigh`,
`lobpcg`, `lanczos`), `accel` (lanczos in float32: the TPU/GPU path),
`float32`, `nocrf`, or `script` (the `maskcut.py` argparse defaults: ViT-S/16,
tau 0.2), e.g. `--config=configs/maskcut.py:vit_small16,lobpcg`.

Hardware / runtime: CPU (2 cores), per 480 image: ViT-B/8 forward ~tens of
seconds; the three cuts take ~8 s with the dense float64 eigh, well under 1 s
with LOBPCG (benchmarks/maskcut.py). On one GPU use batch_size 8.
Expected result: with `--random-init` only a smoke test (masks are
meaningless); with DINO ViT-B/8 weights, the CutLER MaskCut pseudo masks.
"""

import ml_collections

ARCHS = ("vit_small16", "vit_small8", "vit_base16", "vit_base8")
SOLVERS = ("eigh", "lobpcg", "lanczos")


def get_config(arg=None):
  """MaskCut config; see the module docstring for `arg`."""
  c = ml_collections.ConfigDict()
  c.model = ml_collections.ConfigDict()
  c.model.arch = "vit_base8"
  c.fixed_size = 480
  c.batch_size = 1
  c.seed = 0  # random init only

  c.maskcut = ml_collections.ConfigDict()
  c.maskcut.tau = 0.15
  c.maskcut.num_masks = 3
  c.maskcut.eps = 1e-5
  c.maskcut.solver = "eigh"  # eigh | lobpcg | lanczos
  c.maskcut.solve_dtype = "float64"  # float64 | float32
  c.maskcut.lobpcg_iters = 100
  # None: LOBPCG's default (the dtype's epsilon); float32 needs a value.
  c.maskcut.lobpcg_tol = ml_collections.config_dict.placeholder(float)
  # True: deflate the known top eigenvector, block size 1 (docs/maskcut.md).
  c.maskcut.lobpcg_deflate = False
  # solver=lanczos: deflated Lanczos, full reorthogonalisation, stopped on
  # the Ritz residual; with solve_dtype float32 the accelerator path (arg
  # `accel`, docs/maskcut.md). None tol: 100 * the dtype epsilon.
  c.maskcut.lanczos_steps = 48
  c.maskcut.lanczos_tol = ml_collections.config_dict.placeholder(float)
  c.maskcut.min_area_ratio = 0.01
  c.maskcut.iou_thresh = 0.5
  c.maskcut.tie_rtol = 1e-5

  c.post = ml_collections.ConfigDict()
  # DenseCRF when pydensecrf (pip pydensecrf2, the `crf` extra) imports;
  # without it the step is skipped with one warning, and the output JSON's
  # info says which (crf, crf_note). crf_required: its absence is an error.
  c.post.crf = True
  c.post.crf_required = False
  c.post.crf_iou_thresh = 0.5

  for token in (arg.split(",") if arg else []):
    if token in ARCHS:
      c.model.arch = token
    elif token in SOLVERS:
      c.maskcut.solver = token
    elif token == "accel":  # TPU/GPU: float32 deflated Lanczos
      c.maskcut.solver = "lanczos"
      c.maskcut.solve_dtype = "float32"
    elif token == "float32":
      c.maskcut.solve_dtype = "float32"
    elif token == "nocrf":
      c.post.crf = False
    elif token == "script":
      c.model.arch = "vit_small16"
      c.maskcut.tau = 0.2
    else:
      raise ValueError(f"unknown maskcut config arg {token!r}")
  c.lock()
  return c
