"""faceflax: JAX/Flax face analysis (beauty, low-quality recognition, age, representations)."""
import os

# Quiet TensorFlow's C++ start-up banner; tf.data is only our input pipeline.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
