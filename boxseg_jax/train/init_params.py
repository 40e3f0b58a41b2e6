"""Which parameters a fine-tune may re-initialise instead of loading.

Fine-tuning a COCO model (80 classes) on a dataset with another number of
classes cannot load the class-dependent leaves: their shapes differ. Those
leaves, and only those, keep their fresh initialisation (including the
``cls_logits`` prior bias) when ``config.init`` holds them with another
shape; ``checkpoint.merge_init_params`` logs each one by name. Any other
mismatch still fails, naming the parameter.
"""

# "/"-joined parameter paths whose shape depends on model.num_classes.
CLASS_DEPENDENT_LEAVES = (
    "fcos_head/cls_logits/kernel",
    "fcos_head/cls_logits/bias",
)


def is_class_dependent(name: str) -> bool:
  """Whether the parameter ``name`` (e.g. ``fcos_head/cls_logits/bias``)
  depends on the number of classes."""
  return name in CLASS_DEPENDENT_LEAVES
