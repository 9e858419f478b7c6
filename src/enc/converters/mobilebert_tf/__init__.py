"""MobileBERT TensorFlow releases (google-research/mobilebert) -> HF MobileBertForPreTraining."""

from enc.converters.mobilebert_tf.converter import MobileBertTFConverter

__all__ = ["MobileBertTFConverter"]
