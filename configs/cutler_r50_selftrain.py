r"""CutLER round 0 and self-training rounds on CondInst R-50-FPN.

configs/cutler_r50_round0.py for round 0; each round t >= 1 predicts on
the training images with round t-1 (30 detections per image, no score
threshold), keeps predictions with score >= 0.75 - 0.05 t (0.7, 0.65),
adds the previous masks whose max mask IoU with them is < 0.5, and trains
from round t-1's weights with §6.4's self-training schedule: SGD lr 0.005,
80k steps, constant (gamma 1), no DropLoss, copy-paste ratio [0.5, 1.0]
(``config.self_train``; reference §6.2). The thresholds were tuned for
Cascade R-CNN's softmax scores; CondInst's sqrt(cls * ctr) scores may need
others (``--config.self_train.score_thresh``).

  python -m boxseg_jax.self_train --config=configs/cutler_r50_selftrain.py \
      --workdir=gs://BUCKET/cutler --rounds=2 --config.init=dino_r50.npz

A round 0 already trained with boxseg_jax.main in ``DIR/round_0`` is
picked up (its final checkpoint resumes at the last step: only evaluated
again). Hardware: 8 accelerators, 160k + 80k steps per round. Not measured
with this code.
"""

import importlib.util
import os


def get_config(arg=None):
  spec = importlib.util.spec_from_file_location(
      "cutler_r50_round0", os.path.join(os.path.dirname(__file__),
                                        "cutler_r50_round0.py"))
  round0 = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(round0)
  c = round0.get_config(arg)
  st = c.self_train
  st.score_thresh = 0.75
  st.score_thresh_step = 0.05
  st.iou_thresh = 0.5
  st.max_detections = 30
  st.predict_score_thresh = 0.0
  st.droploss = False
  st.copy_paste_min_ratio = 0.5
  st.copy_paste_max_ratio = 1.0
  st.base_lr = 0.005
  st.num_steps = 80000
  st.lr_boundaries = ()
  st.gamma = 1.0
  return c
