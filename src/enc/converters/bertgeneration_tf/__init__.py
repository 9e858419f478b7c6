"""BertGeneration (bert2bert / roberta2roberta) TF-Hub modules -> transformers EncoderDecoderModel."""

from enc.converters.bertgeneration_tf.converter import BertGenerationTFConverter

__all__ = ["BertGenerationTFConverter"]
