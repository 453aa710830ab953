"""Input pipelines: tfds/tf.data, Remark 4 data order, embedded digits dataset."""
