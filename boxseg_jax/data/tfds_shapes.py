"""`boxseg_shapes`: the procedural `shapes` data as a TFDS builder.

It lets the `tfds:NAME:SPLIT` path be exercised offline with a real TFDS
dataset on disk, in the same feature layout as TFDS's ``coco`` (image,
``image/id``, ``objects`` with normalised ``bbox`` and ``label``,
``is_crowd``), plus ``masks`` (uint8 [n, h, w], zlib-encoded).

  python -m boxseg_jax.data.tfds_shapes --data_dir=/tmp/tfds
  ... --config.data.train=tfds:boxseg_shapes:train \
      --config.data.tfds_data_dir=/tmp/tfds
"""

import numpy as np
import tensorflow_datasets as tfds

from boxseg_jax.data import shapes

NAME = "boxseg_shapes"


class BoxsegShapes(tfds.core.GeneratorBasedBuilder):
  """shapes images with boxes, labels and visible-part masks."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  NUM_IMAGES = {"train": 48, "val": 12}
  IMAGE_SIZE = (128, 128)
  SEED = 0

  def _info(self) -> tfds.core.DatasetInfo:
    h, w = self.IMAGE_SIZE
    return tfds.core.DatasetInfo(
        builder=self,
        description="Procedural shapes (boxseg_jax).",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(h, w, 3),
                                         encoding_format="png"),
            "image/id": np.int64,
            "objects": tfds.features.Sequence({
                "bbox": tfds.features.BBoxFeature(),
                "label": tfds.features.ClassLabel(
                    names=list(shapes.CLASS_NAMES)),
                "is_crowd": np.bool_,
            }),
            "masks": tfds.features.Tensor(shape=(None, h, w),
                                          dtype=np.uint8, encoding="zlib"),
        }))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(split)
            for split in self.NUM_IMAGES}

  def _generate_examples(self, split):
    cfg = shapes.ShapesConfig(image_size=self.IMAGE_SIZE, max_size=90.0)
    seed = self.SEED if split == "train" else self.SEED + 1_000_003
    h, w = self.IMAGE_SIZE
    for i in range(self.NUM_IMAGES[split]):
      ex = shapes.generate(seed, i, cfg)
      b = ex["boxes"]
      bbox = np.stack([b[:, 1] / h, b[:, 0] / w, b[:, 3] / h, b[:, 2] / w],
                      axis=1).astype(np.float32).reshape(-1, 4)
      yield i, {
          "image": ex["image"],
          "image/id": ex["image_id"],
          "objects": {"bbox": bbox, "label": ex["labels"],
                      "is_crowd": np.zeros(len(b), bool)},
          "masks": ex["masks"],
      }


def build(data_dir: str) -> None:
  """Prepares the dataset in ``data_dir`` (array_record, for data_source)."""
  builder = BoxsegShapes(data_dir=data_dir, file_format="array_record")
  builder.download_and_prepare()


if __name__ == "__main__":
  import argparse  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--data_dir", required=True)
  build(parser.parse_args().data_dir)
