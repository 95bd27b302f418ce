"""Input data: TFDS builders, SimCLR augmentations, tf.data pipelines."""
