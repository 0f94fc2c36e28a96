//! Text encoders: BERT with the fusion_layer split (bert), RoBERTa (roberta).
